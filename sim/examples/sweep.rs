//! Print the token-latency sweeps behind `tpi-sim plot` as text.
use tpi_sim::{
    plot::standard_figures, Calibration, Cluster, Device, ModelShape, Topology, Workload,
};

fn main() {
    let link = "1ms,300mbit".parse().unwrap();
    let c = Cluster {
        shape: ModelShape::preset("llama2-70b").unwrap(),
        devices: vec![Device::default(); 8],
        topology: Topology::uniform(link),
        calibration: Calibration::default(),
        workload: Workload::default(),
    };
    for f in standard_figures(&c, link, "llama2-70b q4_0") {
        println!("{}", f.title);
        for s in &f.series {
            let pts: Vec<String> = s
                .points
                .iter()
                .map(|(x, y)| format!("{x:.3}:{y:.0}"))
                .collect();
            println!("  {:<5} {}", s.label, pts.join(" "));
        }
    }
}
