//! Log probabilities of generated tokens, for OpenAI's `logprobs`/`top_logprobs`: the
//! model's distribution at each step (log-softmax of the logits, before temperature and
//! penalties), the chosen token's entry and the most likely alternatives.

/// One generated token's log probability and its most likely alternatives.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenLogprob {
    /// The token chosen.
    pub id: u32,
    /// Its log probability.
    pub logprob: f32,
    /// The `n` most likely tokens at this step, most likely first (ties: lower id first).
    pub top: Vec<(u32, f32)>,
}

/// The log probability of `id` under `logits`, and the `top_n` most likely tokens.
/// Computed in f64 (the log-sum-exp over a 100k-token vocabulary loses digits in f32).
pub fn token_logprob(logits: &[f32], id: u32, top_n: usize) -> TokenLogprob {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = max
        + logits
            .iter()
            .map(|&l| (l as f64 - max).exp())
            .sum::<f64>()
            .ln();
    let lp = |i: usize| (logits[i] as f64 - lse) as f32;
    let n = top_n.min(logits.len());
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    let by_logit = |a: &usize, b: &usize| logits[*b].total_cmp(&logits[*a]).then(a.cmp(b));
    if n > 0 && n < idx.len() {
        idx.select_nth_unstable_by(n - 1, by_logit);
    }
    idx.truncate(n);
    idx.sort_by(by_logit);
    TokenLogprob {
        id,
        logprob: logits
            .get(id as usize)
            .map_or(f32::NEG_INFINITY, |_| lp(id as usize)),
        top: idx.into_iter().map(|i| (i as u32, lp(i))).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logprobs_are_a_normalised_log_softmax() {
        let logits: Vec<f32> = (0..1000)
            .map(|i| ((i * 37 % 101) as f32) * 0.05 - 2.0)
            .collect();
        let all = token_logprob(&logits, 3, logits.len());
        let total: f64 = all.top.iter().map(|&(_, l)| (l as f64).exp()).sum();
        assert!((total - 1.0).abs() < 1e-5, "{total}");
        // Sorted, most likely first, and the chosen entry agrees with the list.
        assert!(all.top.windows(2).all(|w| w[0].1 >= w[1].1));
        let mine = all.top.iter().find(|e| e.0 == 3).unwrap().1;
        assert_eq!(all.logprob, mine);
        // The top 5 are the 5 largest logits, in order.
        let t5 = token_logprob(&logits, 3, 5);
        assert_eq!(t5.top, all.top[..5].to_vec());
        // Shifting every logit changes nothing.
        let shifted: Vec<f32> = logits.iter().map(|l| l + 30.0).collect();
        let s = token_logprob(&shifted, 3, 5);
        assert!((s.logprob - t5.logprob).abs() < 1e-4);
        assert_eq!(token_logprob(&logits, 3, 0).top, vec![]);
    }

    #[test]
    fn two_equal_logits_have_log_one_half() {
        let t = token_logprob(&[1.0, 1.0], 1, 2);
        assert!((t.logprob - 0.5f32.ln()).abs() < 1e-6);
        assert_eq!(t.top.iter().map(|e| e.0).collect::<Vec<_>>(), [0, 1]);
    }
}
