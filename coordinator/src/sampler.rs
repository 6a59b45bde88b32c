//! Token sampling: greedy, or temperature with top-k and top-p, from a seeded RNG
//! (same seed, same output).

/// Sampling settings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SamplerConfig {
    /// 0 means greedy.
    pub temperature: f32,
    /// Keep only the k most likely tokens (0 = off).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches p (1 = off).
    pub top_p: f32,
    /// RNG seed.
    pub seed: u64,
    /// Subtracted from a token's logit once per time it was already generated
    /// (OpenAI's `frequency_penalty`, -2 … 2; 0 = off).
    pub frequency_penalty: f32,
    /// Subtracted from the logit of every token generated at least once
    /// (OpenAI's `presence_penalty`, -2 … 2; 0 = off).
    pub presence_penalty: f32,
}

impl Default for SamplerConfig {
    fn default() -> Self {
        SamplerConfig {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
        }
    }
}

/// A sampler setting out of its range: the field (OpenAI's name for it) and why.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct SamplerError {
    /// The request field (`temperature`, `top_p`, `top_k`, `frequency_penalty`, `presence_penalty`).
    pub field: &'static str,
    /// What is wrong with it.
    pub message: String,
}

impl SamplerConfig {
    /// Rejects settings that have no meaning: a temperature outside [0, 2] (beyond 2 the
    /// output is noise, and a typo such as 1e9 is one), p outside (0, 1], a penalty
    /// outside [-2, 2]. The ranges are OpenAI's.
    pub fn validate(&self) -> Result<(), SamplerError> {
        let bad = |field, message| Err(SamplerError { field, message });
        let t = self.temperature;
        if !(0.0..=2.0).contains(&t) {
            return bad(
                "temperature",
                format!("temperature must be in [0, 2], got {t}"),
            );
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad(
                "top_p",
                format!("top_p must be in (0, 1], got {}", self.top_p),
            );
        }
        for (field, v) in [
            ("frequency_penalty", self.frequency_penalty),
            ("presence_penalty", self.presence_penalty),
        ] {
            if !(-2.0..=2.0).contains(&v) {
                return bad(field, format!("{field} must be in [-2, 2], got {v}"));
            }
        }
        Ok(())
    }

    /// The `top_k` setting for a requested `k` on a `vocab`-token model: 0 (off) when `k`
    /// keeps every token anyway.
    pub fn top_k_for(k: i64, vocab: usize) -> Result<usize, SamplerError> {
        if k < 0 {
            return Err(SamplerError {
                field: "top_k",
                message: format!("top_k must be >= 0, got {k}"),
            });
        }
        Ok(if k as u64 >= vocab as u64 {
            0
        } else {
            k as usize
        })
    }
}

/// SplitMix64: small, fast, and reproducible across platforms.
#[derive(Clone, Debug)]
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Picks the next token from logits.
#[derive(Clone, Debug)]
pub struct Sampler {
    cfg: SamplerConfig,
    rng: Rng,
    /// How often each token was chosen so far (for the penalties).
    counts: std::collections::HashMap<u32, u32>,
}

/// Index of the largest logit (the first on ties); None for an empty slice.
pub fn argmax(logits: &[f32]) -> Option<usize> {
    let mut best: Option<(usize, f32)> = None;
    for (i, &v) in logits.iter().enumerate() {
        if best.is_none_or(|(_, b)| v > b) {
            best = Some((i, v));
        }
    }
    best.map(|(i, _)| i)
}

impl Sampler {
    /// A sampler with its RNG seeded from the config.
    pub fn new(cfg: SamplerConfig) -> Self {
        Sampler {
            cfg,
            rng: Rng(cfg.seed),
            counts: std::collections::HashMap::new(),
        }
    }

    /// Chooses a token id (and remembers it for the penalties).
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let (f, p) = (self.cfg.frequency_penalty, self.cfg.presence_penalty);
        let id = if (f != 0.0 || p != 0.0) && !self.counts.is_empty() {
            let mut pen = logits.to_vec();
            for (&t, &n) in &self.counts {
                if let Some(l) = pen.get_mut(t as usize) {
                    *l -= f * n as f32 + p;
                }
            }
            self.pick(&pen)
        } else {
            self.pick(logits)
        };
        *self.counts.entry(id).or_default() += 1;
        id
    }

    fn pick(&mut self, logits: &[f32]) -> u32 {
        if self.cfg.temperature == 0.0 || logits.len() <= 1 {
            return argmax(logits).unwrap_or(0) as u32;
        }
        let mut idx: Vec<usize> = (0..logits.len()).collect();
        idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
        if self.cfg.top_k > 0 {
            idx.truncate(self.cfg.top_k);
        }
        let t = self.cfg.temperature as f64;
        let m = logits[idx[0]] as f64;
        let mut probs: Vec<f64> = idx
            .iter()
            .map(|&i| ((logits[i] as f64 - m) / t).exp())
            .collect();
        let sum: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= sum);
        if self.cfg.top_p < 1.0 {
            let mut cum = 0.0;
            let mut keep = probs.len();
            for (j, p) in probs.iter().enumerate() {
                cum += p;
                if cum >= self.cfg.top_p as f64 {
                    keep = j + 1;
                    break;
                }
            }
            probs.truncate(keep);
            idx.truncate(keep);
            let s: f64 = probs.iter().sum();
            probs.iter_mut().for_each(|p| *p /= s);
        }
        let r = self.rng.next_f64();
        let mut cum = 0.0;
        for (j, p) in probs.iter().enumerate() {
            cum += p;
            if r < cum {
                return idx[j] as u32;
            }
        }
        idx[probs.len() - 1] as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_is_argmax() {
        let mut s = Sampler::new(SamplerConfig::default());
        assert_eq!(s.sample(&[0.1, 3.0, -1.0, 3.0]), 1);
    }

    #[test]
    fn same_seed_same_tokens() {
        let logits: Vec<f32> = (0..100).map(|i| ((i * 37 % 11) as f32) * 0.3).collect();
        let cfg = SamplerConfig {
            temperature: 1.0,
            top_k: 20,
            top_p: 0.9,
            seed: 7,
            ..Default::default()
        };
        let a: Vec<u32> = (0..50)
            .scan(Sampler::new(cfg), |s, _| Some(s.sample(&logits)))
            .collect();
        let b: Vec<u32> = (0..50)
            .scan(Sampler::new(cfg), |s, _| Some(s.sample(&logits)))
            .collect();
        assert_eq!(a, b);
        let c: Vec<u32> = (0..50)
            .scan(Sampler::new(SamplerConfig { seed: 8, ..cfg }), |s, _| {
                Some(s.sample(&logits))
            })
            .collect();
        assert_ne!(a, c);
    }

    #[test]
    fn top_k_one_is_greedy_and_top_p_restricts() {
        let logits = [1.0f32, 5.0, 2.0, 4.9];
        let mut s = Sampler::new(SamplerConfig {
            temperature: 5.0,
            top_k: 1,
            top_p: 1.0,
            seed: 3,
            ..Default::default()
        });
        for _ in 0..20 {
            assert_eq!(s.sample(&logits), 1);
        }
        let mut s = Sampler::new(SamplerConfig {
            temperature: 1.0,
            top_k: 0,
            top_p: 0.5,
            seed: 3,
            ..Default::default()
        });
        for _ in 0..50 {
            assert!(matches!(s.sample(&logits), 1 | 3));
        }
    }

    #[test]
    fn temperature_spreads_choices() {
        let logits = [0.0f32; 8];
        let mut s = Sampler::new(SamplerConfig {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            seed: 1,
            ..Default::default()
        });
        let mut seen = [false; 8];
        for _ in 0..200 {
            seen[s.sample(&logits) as usize] = true;
        }
        assert!(seen.iter().all(|&x| x));
    }

    #[test]
    fn penalties_push_repeated_tokens_down() {
        let logits = [3.0f32, 2.5, 0.0];
        // Greedy: without penalties always 0.
        let mut s = Sampler::new(SamplerConfig::default());
        assert_eq!(
            (0..3).map(|_| s.sample(&logits)).collect::<Vec<_>>(),
            [0, 0, 0]
        );
        // Presence 1: after one 0, token 0 scores 2.0 < 2.5; after one 1, 1.5 < 2.0.
        let mut s = Sampler::new(SamplerConfig {
            presence_penalty: 1.0,
            ..Default::default()
        });
        assert_eq!(
            (0..3).map(|_| s.sample(&logits)).collect::<Vec<_>>(),
            [0, 1, 0]
        );
        // Frequency 0.4: 0 (3.0), 0 (2.6), 1 (2.5 > 2.2), 0 (2.2 > 2.1), ...
        let mut s = Sampler::new(SamplerConfig {
            frequency_penalty: 0.4,
            ..Default::default()
        });
        assert_eq!(
            (0..4).map(|_| s.sample(&logits)).collect::<Vec<_>>(),
            [0, 0, 1, 0]
        );
        // Negative penalties favour repeats.
        let mut s = Sampler::new(SamplerConfig {
            presence_penalty: -2.0,
            ..Default::default()
        });
        assert_eq!(s.sample(&[2.0, 2.5]), 1);
        assert_eq!(s.sample(&[3.0, 1.5]), 1);
        assert!(SamplerConfig {
            frequency_penalty: 2.5,
            ..Default::default()
        }
        .validate()
        .is_err());
    }

    #[test]
    fn invalid_settings_are_rejected_naming_the_field() {
        let field = |c: SamplerConfig| c.validate().unwrap_err().field;
        for t in [-1.0, 2.5, f32::NAN, f32::INFINITY] {
            let c = SamplerConfig {
                temperature: t,
                ..Default::default()
            };
            assert_eq!(field(c), "temperature", "{t}");
        }
        for p in [0.0, 1.5, f32::NAN] {
            let c = SamplerConfig {
                top_p: p,
                ..Default::default()
            };
            assert_eq!(field(c), "top_p", "{p}");
        }
        let c = SamplerConfig {
            presence_penalty: -3.0,
            ..Default::default()
        };
        assert_eq!(field(c), "presence_penalty");
        let edge = SamplerConfig {
            temperature: 2.0,
            top_p: 1.0,
            frequency_penalty: -2.0,
            presence_penalty: 2.0,
            ..Default::default()
        };
        assert!(edge.validate().is_ok());
        assert_eq!(SamplerConfig::top_k_for(-1, 10).unwrap_err().field, "top_k");
        assert_eq!(SamplerConfig::top_k_for(10, 10), Ok(0));
        assert_eq!(SamplerConfig::top_k_for(3, 10), Ok(3));
    }
}
