//! What the cluster measured about its links at session start, and the allreduce
//! algorithm the policy runs for each payload size: printed by `--profile`, included in
//! `--json`'s backend facts.

use std::fmt;

use tpi_node::net::{Algo, Costs, Policy, WireDType};

/// One measured directed link.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct MeasuredLink {
    /// Sending rank.
    pub from: usize,
    /// Receiving rank.
    pub to: usize,
    /// One-way latency (half the fastest ping's round trip), in ms.
    pub latency_ms: f64,
    /// Bandwidth from the bulk transfer, in Mbit/s.
    pub mbit_s: f64,
    /// The sender's cost per extra message, in µs.
    pub per_message_us: f64,
}

/// The policy's algorithm for one payload, and every algorithm's predicted time.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct PayloadChoice {
    /// Tokens in the step (1: decode).
    pub tokens: usize,
    /// Payload bytes of one allreduce.
    pub bytes: usize,
    /// The algorithm that runs.
    pub algo: Algo,
    /// Predicted ms of one allreduce per algorithm, in [`Algo::ALL`] order.
    pub predicted_ms: Vec<(Algo, f64)>,
}

/// The links and the choices made from them.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct LinkReport {
    /// Where the numbers come from ("measured at session start", a link spec).
    pub source: String,
    /// The policy (`auto` or one algorithm).
    pub policy: Policy,
    /// Every directed link the group has, in rank order.
    pub links: Vec<MeasuredLink>,
    /// Decode and prefill payloads.
    pub choices: Vec<PayloadChoice>,
}

/// Step sizes the report shows: a decode token and prefill chunks.
const TOKENS: [usize; 3] = [1, 16, 128];

impl LinkReport {
    /// The report (numbers from `source`) for a group of `costs.world()` ranks under
    /// `policy` whose allreduces carry `hidden` elements per token as `dtype`.
    pub fn new(
        source: impl Into<String>,
        costs: &Costs,
        policy: Policy,
        dtype: WireDType,
        hidden: usize,
    ) -> LinkReport {
        let w = costs.world();
        let links = (0..w)
            .flat_map(|f| policy.peers(f, w).into_iter().map(move |t| (f, t)))
            .map(|(from, to)| {
                let l = costs.link(from, to);
                MeasuredLink {
                    from,
                    to,
                    latency_ms: l.latency_s * 1e3,
                    mbit_s: l.bytes_per_s.map_or(f64::INFINITY, |b| b * 8.0 / 1e6),
                    per_message_us: l.per_message_s * 1e6,
                }
            })
            .collect();
        let eb = dtype.elem_bytes();
        let choices = TOKENS
            .iter()
            .map(|&tokens| {
                let n = tokens * hidden;
                let (_, prices) = costs.choose(n, eb);
                PayloadChoice {
                    tokens,
                    bytes: dtype.wire_len(n),
                    algo: policy.algo_for(Some(costs), n, eb),
                    predicted_ms: Algo::ALL
                        .iter()
                        .zip(prices)
                        .map(|(&a, p)| (a, p * 1e3))
                        .collect(),
                }
            })
            .collect();
        LinkReport {
            source: source.into(),
            policy,
            links,
            choices,
        }
    }
}

impl fmt::Display for LinkReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "links, {} (one-way):", self.source)?;
        writeln!(f, "  from  to  latency ms    Mbit/s  µs/message")?;
        for l in &self.links {
            writeln!(
                f,
                "  {:>4} {:>3} {:>11.3} {:>9.0} {:>11.1}",
                l.from, l.to, l.latency_ms, l.mbit_s, l.per_message_us
            )?;
        }
        writeln!(
            f,
            "allreduce {}: predicted ms per allreduce (* runs)",
            self.policy
        )?;
        write!(f, "  tokens    bytes")?;
        for a in Algo::ALL {
            write!(f, " {:>8}", a.to_string())?;
        }
        writeln!(f)?;
        for c in &self.choices {
            write!(f, "  {:>6} {:>8}", c.tokens, c.bytes)?;
            for &(a, ms) in &c.predicted_ms {
                let mark = if a == c.algo { "*" } else { " " };
                write!(f, " {ms:>7.3}{mark}")?;
            }
            writeln!(f)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tpi_node::net::LinkCost;

    #[test]
    fn report_lists_the_links_and_marks_the_choice() {
        let costs = Costs::uniform(
            3,
            LinkCost {
                latency_s: 1e-3,
                bytes_per_s: Some(300e6 / 8.0),
                per_message_s: 50e-6,
            },
            0.5e-9,
        );
        let r = LinkReport::new("measured", &costs, Policy::Auto, WireDType::F32, 576);
        assert_eq!(r.links.len(), 6);
        assert!((r.links[0].mbit_s - 300.0).abs() < 1e-6);
        assert_eq!(r.choices[0].bytes, 576 * 4);
        assert_eq!(r.choices[0].algo, Algo::Mesh);
        let text = r.to_string();
        assert!(text.contains("allreduce auto"), "{text}");
        assert!(text.lines().any(|l| l.contains('*')), "{text}");
        // A fixed policy runs its algorithm whatever the prices, over its own links.
        let r = LinkReport::new(
            "measured",
            &costs,
            Policy::Fixed(Algo::Star),
            WireDType::F16,
            576,
        );
        assert_eq!(r.links.len(), 4);
        assert!(r.choices.iter().all(|c| c.algo == Algo::Star));
        assert_eq!(r.choices[0].bytes, 576 * 2);
    }
}
