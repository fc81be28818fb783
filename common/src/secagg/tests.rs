//! The protocol end to end, in memory: 10 participants, dropouts, aborts and abuse.

use rand::{Rng, SeedableRng};

use super::*;

const LEN: usize = 1000;

fn ctx() -> RoundContext {
    RoundContext { session: [42; 32], round: 7, attempt: 1 }
}

/// Everyone through the four stages. `drop_before` leave after sharing keys (no masked input);
/// `drop_after` leave after their masked input (no unmask answer).
struct Run {
    server: SecAggServer,
    clients: Vec<SecAggClient>,
}

impl Run {
    fn new(n: usize, settings: SecAggSettings) -> Self {
        let plan = RoundPlan::new(&settings, n, &ctx()).unwrap();
        let mut rng = rand::rng();
        let clients = (0..n as u32).map(|i| SecAggClient::new(i, plan.clone(), ctx(), &mut rng).unwrap()).collect();
        Self { server: SecAggServer::new(plan, ctx(), LEN), clients }
    }

    /// Runs stages 1 and 2 for everyone.
    fn share(&mut self) {
        for c in &self.clients {
            self.server.receive_keys(c.id(), c.advertise()).unwrap();
        }
        let directory = self.server.close_keys().unwrap();
        for c in &mut self.clients {
            let shared = c.share_keys(&directory).unwrap();
            self.server.receive_shares(c.id(), shared).unwrap();
        }
        self.server.close_shares().unwrap();
    }

    /// Runs stage 3 for everyone not in `drop_before`; returns what the server received.
    fn mask(&mut self, inputs: &[Vec<u32>], drop_before: &[u32]) -> Result<Vec<Vec<u32>>, SecAggError> {
        let mut sent = Vec::new();
        for c in self.clients.iter_mut().filter(|c| !drop_before.contains(&c.id())) {
            let masked = c.masked_input(&self.server.inbox(c.id()), &inputs[c.id() as usize]).unwrap();
            self.server.receive_masked(c.id(), &masked).unwrap();
            sent.push(masked);
        }
        Ok(sent)
    }

    fn unmask(&mut self, gone: &[u32]) -> Result<SecAggOutcome, SecAggError> {
        let request = self.server.close_masked()?;
        for c in self.clients.iter_mut().filter(|c| !gone.contains(&c.id())) {
            let response = c.unmask(&request).unwrap();
            self.server.receive_unmask(c.id(), response).unwrap();
        }
        self.server.finish()
    }

    fn run(
        n: usize,
        settings: SecAggSettings,
        inputs: &[Vec<u32>],
        drop_before: &[u32],
        drop_after: &[u32],
    ) -> Result<SecAggOutcome, SecAggError> {
        let mut run = Run::new(n, settings);
        run.share();
        run.mask(inputs, drop_before)?;
        let gone: Vec<u32> = drop_before.iter().chain(drop_after).copied().collect();
        run.unmask(&gone)
    }
}

fn random_inputs(n: usize, max: u32) -> Vec<Vec<u32>> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    (0..n).map(|_| (0..LEN).map(|_| rng.random_range(0..=max)).collect()).collect()
}

fn plain_sum(inputs: &[Vec<u32>], include: impl Fn(usize) -> bool) -> Vec<u32> {
    let mut sum = vec![0u32; LEN];
    for (_, input) in inputs.iter().enumerate().filter(|(i, _)| include(*i)) {
        for (s, v) in sum.iter_mut().zip(input) {
            *s = s.wrapping_add(*v);
        }
    }
    sum
}

#[test]
fn ten_clients_sum_exactly_and_dequantize_within_the_bound() {
    let n = 10;
    let plan = QuantizationPlan::new(1.0, n as u32).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    // Some values beyond the clip, to check that clipping happens before the sum.
    let updates: Vec<Vec<f32>> = (0..n).map(|_| (0..LEN).map(|_| rng.random_range(-1.5f32..1.5)).collect()).collect();
    let inputs: Vec<Vec<u32>> = updates.iter().map(|u| plan.quantize(u, &mut rng)).collect();
    let outcome = Run::run(n, SecAggSettings::default(), &inputs, &[], &[]).unwrap();
    assert_eq!(outcome.sum, plain_sum(&inputs, |_| true));
    assert_eq!((outcome.masked, outcome.dropped, outcome.recovered), (10, 0, 0));

    let got = plan.dequantize_sum(&outcome.sum, n).unwrap();
    for (j, g) in got.iter().enumerate() {
        let want: f64 = updates.iter().map(|u| f64::from(u[j].clamp(-1.0, 1.0))).sum();
        // Below one step per input, plus the rounding of the f32 result.
        let bound = n as f64 * plan.step() + want.abs() * f64::from(f32::EPSILON);
        assert!((f64::from(*g) - want).abs() < bound, "coordinate {j}: {g} vs {want}, bound {bound}");
    }
}

#[test]
fn three_drop_before_masked_input_gives_the_exact_sum_of_seven() {
    let inputs = random_inputs(10, 1 << 20);
    let outcome = Run::run(10, SecAggSettings::default(), &inputs, &[1, 4, 8], &[]).unwrap();
    assert_eq!(outcome.sum, plain_sum(&inputs, |i| ![1, 4, 8].contains(&i)));
    assert_eq!((outcome.masked, outcome.dropped, outcome.recovered), (7, 3, 3));
}

#[test]
fn three_drop_after_masked_input_gives_the_exact_sum_of_ten() {
    let inputs = random_inputs(10, 1 << 20);
    let outcome = Run::run(10, SecAggSettings::default(), &inputs, &[], &[0, 5, 9]).unwrap();
    assert_eq!(outcome.sum, plain_sum(&inputs, |_| true));
    assert_eq!((outcome.masked, outcome.dropped, outcome.recovered), (10, 0, 0));
}

#[test]
fn sparse_neighbours_survive_drops_on_both_sides() {
    let settings = SecAggSettings { neighbours: Some(6), threshold: Threshold::Majority };
    let plan = RoundPlan::new(&settings, 10, &ctx()).unwrap();
    assert_eq!(plan.threshold(), 4);
    for a in 0..10 {
        assert_eq!(plan.neighbours(a).len(), 6);
        for &b in plan.neighbours(a) {
            assert!(plan.neighbours(b).contains(&a), "graph not symmetric at {a}-{b}");
        }
    }
    let inputs = random_inputs(10, 1 << 20);
    // Two of any participant's six holders gone still leaves the threshold of four.
    let outcome = Run::run(10, settings, &inputs, &[2], &[6]).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(outcome.sum, plain_sum(&inputs, |i| i != 2));
}

#[test]
fn below_the_threshold_the_attempt_aborts_with_no_output() {
    let inputs = random_inputs(10, 1 << 20);
    // Threshold 5 of 9 neighbours, so 6 must send a masked input; 5 do.
    let err = Run::run(10, SecAggSettings::default(), &inputs, &[0, 1, 2, 3, 4], &[]).unwrap_err();
    assert_eq!(err, SecAggError::BelowThreshold { stage: Stage::MaskedInput, have: 5, need: 6 });

    // All ten send masked inputs, but only four answer the unmask stage.
    let mut run = Run::new(10, SecAggSettings::default());
    run.share();
    run.mask(&inputs, &[]).unwrap();
    let err = run.unmask(&[0, 1, 2, 3, 4, 5]).unwrap_err();
    assert_eq!(err, SecAggError::BelowThreshold { stage: Stage::Unmask, have: 4, need: 5 });
    // And nothing comes out afterwards.
    assert!(matches!(run.server.finish(), Err(SecAggError::WrongStage { .. })));
}

#[test]
fn a_request_for_both_shares_of_one_peer_is_refused() {
    let inputs = random_inputs(10, 1000);
    let mut run = Run::new(10, SecAggSettings::default());
    run.share();
    run.mask(&inputs, &[]).unwrap();
    let both = UnmaskRequest { survivors: (0..10).collect(), dropped: vec![3] };
    let err = run.clients[0].unmask(&both).unwrap_err();
    assert!(matches!(err, SecAggError::Refused(ref m) if m.contains("participant 3")), "{err}");

    // Asked once for the seed share, the client will not later give the key share.
    let honest = UnmaskRequest { survivors: (0..10).collect(), dropped: vec![] };
    let first = run.clients[0].unmask(&honest).unwrap();
    assert!(first.key_shares.is_empty());
    let second = UnmaskRequest { survivors: (0..10).filter(|&i| i != 3).collect(), dropped: vec![3] };
    assert!(matches!(run.clients[0].unmask(&second), Err(SecAggError::Replay(_))));
}

#[test]
fn replayed_and_malformed_messages_are_refused_with_a_reason() {
    let mut run = Run::new(5, SecAggSettings::default());
    let keys0 = run.clients[0].advertise();
    run.server.receive_keys(0, keys0).unwrap();
    assert!(matches!(run.server.receive_keys(0, keys0), Err(SecAggError::Replay(_))));
    assert!(matches!(run.server.receive_keys(1, keys0), Err(SecAggError::Malformed(_))));
    assert_eq!(run.server.receive_keys(9, run.clients[1].advertise()), Err(SecAggError::NotParticipant(9)));
    assert!(matches!(run.server.receive_masked(0, &[0; LEN]), Err(SecAggError::WrongStage { .. })));
    for c in &run.clients[1..] {
        run.server.receive_keys(c.id(), c.advertise()).unwrap();
    }
    let directory = run.server.close_keys().unwrap();
    let mut shared: Vec<SharedKeys> = run.clients.iter_mut().map(|c| c.share_keys(&directory).unwrap()).collect();
    // Shares claiming another sender, or missing a neighbour, are refused.
    let mut forged = shared[0].clone();
    forged.shares[0].from = 2;
    assert!(matches!(run.server.receive_shares(0, forged), Err(SecAggError::Malformed(_))));
    let mut short = shared[0].clone();
    short.shares.pop();
    assert!(matches!(run.server.receive_shares(0, short), Err(SecAggError::Malformed(_))));
    // A tampered ciphertext passes the relay but fails authentication at its holder.
    shared[0].shares[0].ciphertext[5] ^= 0x80;
    let victim = shared[0].shares[0].to;
    for (i, s) in shared.into_iter().enumerate() {
        run.server.receive_shares(i as u32, s).unwrap();
    }
    run.server.close_shares().unwrap();
    let inbox = run.server.inbox(victim);
    let err = run.clients[victim as usize].masked_input(&inbox, &[0; LEN]).unwrap_err();
    assert!(matches!(err, SecAggError::Malformed(ref m) if m.contains("authentication")), "{err}");
    // Wrong length and replayed masked inputs.
    assert!(matches!(run.server.receive_masked(1, &[0; 3]), Err(SecAggError::Malformed(_))));
    run.server.receive_masked(1, &[0; LEN]).unwrap();
    assert!(matches!(run.server.receive_masked(1, &[0; LEN]), Err(SecAggError::Replay(_))));
}

#[test]
fn a_lying_holder_causes_an_abort_not_a_wrong_sum() {
    let inputs = random_inputs(10, 1000);
    let mut run = Run::new(10, SecAggSettings::default());
    run.share();
    run.mask(&inputs, &[]).unwrap();
    let request = run.server.close_masked().unwrap();
    for (i, c) in run.clients.iter_mut().enumerate() {
        let mut response = c.unmask(&request).unwrap();
        // Holder 0's share is among the first the coordinator uses; it lies about 7's seed.
        if i == 0 {
            for s in response.seed_shares.iter_mut().filter(|s| s.owner == 7) {
                s.share[10] ^= 1;
            }
        }
        run.server.receive_unmask(c.id(), response).unwrap();
    }
    assert_eq!(run.server.finish(), Err(SecAggError::InconsistentShares(7)));
}

#[test]
fn a_response_with_the_wrong_kind_of_share_is_refused() {
    let inputs = random_inputs(10, 1000);
    let mut run = Run::new(10, SecAggSettings::default());
    run.share();
    run.mask(&inputs, &[4]).unwrap();
    let request = run.server.close_masked().unwrap();
    let mut response = run.clients[0].unmask(&request).unwrap();
    // Relabel the dropped participant's key share as a seed share.
    let key = response.key_shares.pop().unwrap();
    response.seed_shares.push(key);
    assert!(matches!(run.server.receive_unmask(0, response), Err(SecAggError::Malformed(_))));
}

/// The chi-square statistic of the byte values of `words` against the uniform distribution.
fn byte_chi_square(words: &[u32]) -> f64 {
    let mut counts = [0u64; 256];
    for w in words {
        for b in w.to_le_bytes() {
            counts[b as usize] += 1;
        }
    }
    let expected = (words.len() * 4) as f64 / 256.0;
    counts.iter().map(|&c| (c as f64 - expected).powi(2) / expected).sum()
}

/// Chi-square with 255 degrees of freedom exceeds this with probability 1e-6 (Wilson-Hilferty:
/// 255 * (1 - 2/2295 + 4.753 * sqrt(2/2295))^3 = 377.2), so an honest run fails about once in a
/// million tries while a biased mask fails every time.
const CHI_SQUARE_255_P1E6: f64 = 377.2;

#[test]
fn masked_zero_inputs_look_uniform() {
    let n = 10;
    let plan = QuantizationPlan::new(1.0, n as u32).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let zeros: Vec<Vec<u32>> = (0..n).map(|_| plan.quantize(&vec![0.0; LEN], &mut rng)).collect();
    // The test can fail: the unmasked quantized zeros are nowhere near uniform.
    assert!(byte_chi_square(&zeros[0]) > 100.0 * CHI_SQUARE_255_P1E6);

    let mut run = Run::new(n, SecAggSettings::default());
    run.share();
    let sent = run.mask(&zeros, &[]).unwrap();
    let all: Vec<u32> = sent.iter().flatten().copied().collect();
    for (i, masked) in sent.iter().enumerate() {
        let chi = byte_chi_square(masked);
        assert!(chi < CHI_SQUARE_255_P1E6, "participant {i}: chi-square {chi}");
    }
    assert!(byte_chi_square(&all) < CHI_SQUARE_255_P1E6);
    // Each of the 32 bit positions is set in about half of the 10 000 words (5.5 sigma).
    for bit in 0..32 {
        let ones = all.iter().filter(|w| *w >> bit & 1 == 1).count() as f64;
        let half = all.len() as f64 / 2.0;
        assert!((ones - half).abs() < 5.5 * half.sqrt() / 2.0_f64.sqrt(), "bit {bit}: {ones} ones");
    }
    // And the unmasked sum is still exact.
    let outcome = run.unmask(&[]).unwrap();
    assert_eq!(outcome.sum, plain_sum(&zeros, |_| true));
}

#[test]
fn thresholds_parse_and_must_be_a_strict_majority() {
    assert_eq!("0.6".parse::<Threshold>().unwrap(), Threshold::Fraction(0.6));
    assert_eq!("6".parse::<Threshold>().unwrap(), Threshold::Count(6));
    assert!("0.5".parse::<Threshold>().is_err());
    assert!("abc".parse::<Threshold>().unwrap_err().contains("abc"));
    assert_eq!(resolve_threshold(Threshold::Majority, 9).unwrap(), 5);
    assert_eq!(resolve_threshold(Threshold::Fraction(0.6), 9).unwrap(), 6);
    assert!(resolve_threshold(Threshold::Count(4), 9).unwrap_err().to_string().contains("5..=9"));
    assert!(resolve_threshold(Threshold::Count(10), 9).is_err());
    assert!(RoundPlan::new(&SecAggSettings::default(), 2, &ctx()).is_err());
    assert!(RoundPlan::new(&SecAggSettings::default(), 255, &ctx()).is_err());
}
