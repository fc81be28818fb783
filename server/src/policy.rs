//! The round policy, as pure functions: when a round may start, whom it samples, and when it
//! closes. The engine ([`crate::coordinator`]) calls them with what it sees; they do no I/O and
//! read no clock of their own, so every close condition is unit-tested below.

use std::collections::{BTreeSet, HashMap, HashSet};

use rand::seq::SliceRandom;
use rand::Rng;
use tokio::time::Instant;

/// True when enough clients are connected to start a round.
pub fn should_start(eligible: usize, min_clients: usize) -> bool {
    eligible >= min_clients.max(1)
}

/// How many updates a round wants, and how many clients it asks for them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SampleSize {
    /// Updates wanted: the round closes early once this many are in, when it over-sampled.
    pub target: usize,
    /// Clients sampled: `target` times the over-sampling factor, at most all eligible.
    pub sampled: usize,
}

/// The sample size of a round among `eligible` clients. `clients_per_round` 0 means all of them.
pub fn sample_size(eligible: usize, clients_per_round: usize, min_clients: usize, over_sample: f64) -> SampleSize {
    let target = if clients_per_round == 0 { eligible } else { clients_per_round.max(min_clients).min(eligible) };
    let wanted = target as f64 * over_sample.max(1.0);
    // 100 × 1.1 is 110.00000000000001 in f64: a product within rounding of a whole number is that number.
    let whole = wanted.round();
    let wanted = if (wanted - whole).abs() <= 1e-9 * whole.max(1.0) { whole } else { wanted.ceil() };
    let sampled = (wanted as usize).min(eligible);
    SampleSize { target, sampled }
}

/// Picks `size.sampled` of the `eligible` clients at random.
pub fn sample(mut eligible: Vec<String>, size: SampleSize, rng: &mut impl Rng) -> Vec<String> {
    eligible.shuffle(rng);
    eligible.truncate(size.sampled);
    eligible
}

/// What the engine knows about an open round attempt when it decides whether to close it.
#[derive(Clone, Copy, Debug)]
pub struct RoundView<'a> {
    /// Clients asked for an update.
    pub sampled: &'a HashSet<String>,
    /// Sampled clients whose update was accepted.
    pub accepted: &'a HashSet<String>,
    /// Sampled clients whose update was refused (or lost).
    pub rejected: &'a HashSet<String>,
    /// Clients with an open work stream now.
    pub connected: &'a HashSet<String>,
    /// Updates wanted ([`SampleSize::target`]).
    pub target: usize,
    /// Fewest accepted updates that make a round.
    pub min_clients: usize,
    /// When the attempt stops waiting.
    pub deadline: Instant,
}

impl RoundView<'_> {
    fn has_answered(&self, client: &str) -> bool {
        self.accepted.contains(client) || self.rejected.contains(client)
    }

    /// Sampled clients that have not answered yet.
    pub fn pending(&self) -> impl Iterator<Item = &String> + '_ {
        self.sampled.iter().filter(|c| !self.has_answered(c))
    }

    fn enough(&self) -> bool {
        self.accepted.len() >= self.min_clients.max(1)
    }
}

/// Why an attempt stopped collecting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseReason {
    /// Every sampled client answered.
    AllAnswered,
    /// The round over-sampled and the wanted number of updates is in; stragglers are told to stop.
    TargetReached,
    /// Enough updates are in and every client that did not answer has disconnected.
    StragglersGone,
    /// The deadline passed.
    Deadline,
}

/// What to do with an open attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Close {
    /// Keep collecting.
    Open,
    /// Close it and aggregate: enough updates are in.
    Complete(CloseReason),
    /// Close it and run the round again: too few updates.
    Retry(CloseReason),
}

/// Decides whether an attempt closes at `now`, and whether it then completes or is retried.
///
/// A sampled client that disconnected without answering is waited for (until the deadline) as
/// long as too few updates are in: it may reconnect and get the task again.
pub fn should_close(view: &RoundView<'_>, now: Instant) -> Close {
    let pending = view.pending().count();
    let gone = view.pending().filter(|c| !view.connected.contains(*c)).count();
    let over_sampled = view.sampled.len() > view.target;
    let reason = if pending == 0 {
        CloseReason::AllAnswered
    } else if over_sampled && view.accepted.len() >= view.target {
        CloseReason::TargetReached
    } else if gone == pending && view.enough() {
        CloseReason::StragglersGone
    } else if now >= view.deadline {
        CloseReason::Deadline
    } else {
        return Close::Open;
    };
    if view.enough() {
        Close::Complete(reason)
    } else {
        Close::Retry(reason)
    }
}

/// True when a client that (re)connects during the attempt should get its task (again): it was
/// sampled and has not answered.
pub fn resend_task_on_connect(view: &RoundView<'_>, client: &str) -> bool {
    view.sampled.contains(client) && !view.has_answered(client)
}

/// The reasons, when every sampled client of an attempt reported that its local training failed.
pub fn all_training_failed(sampled: &HashSet<String>, failures: &HashMap<String, String>) -> Option<String> {
    if sampled.is_empty() || !sampled.iter().all(|c| failures.contains_key(c)) {
        return None;
    }
    let reasons: BTreeSet<&str> =
        failures.iter().filter(|(c, _)| sampled.contains(*c)).map(|(_, r)| r.as_str()).collect();
    Some(format!(
        "local training failed on every sampled client: {}",
        reasons.into_iter().collect::<Vec<_>>().join("; ")
    ))
}

/// Counts attempts in a row that failed the same way: the same reasons from every sampled client.
#[derive(Debug, Default)]
pub struct RepeatedFailure {
    last: Option<String>,
    /// Attempts in a row with the last failure.
    pub count: u32,
}

impl RepeatedFailure {
    /// Records an attempt that failed: `Some(reasons)` when every client's training failed (from
    /// [`all_training_failed`]), `None` for any other failure (stragglers, refused updates), which
    /// ends the series. Returns the length of the series.
    pub fn record(&mut self, failure: Option<String>) -> u32 {
        match failure {
            None => {
                self.last = None;
                self.count = 0;
            }
            Some(f) if self.last.as_deref() == Some(f.as_str()) => self.count += 1,
            Some(f) => {
                self.last = Some(f);
                self.count = 1;
            }
        }
        self.count
    }
}

/// When a wait that runs its check after every change, at `wake_at`, and at least every
/// `period` next wakes up by itself: the sooner of the two, and never in the past. A `wake_at`
/// gone by means "every `period`" from then on; waking at it again would run the check in a busy
/// loop (a coordinator waiting for clients spun a core, and the spin costs more with every
/// connected client).
pub fn next_wake(wake_at: Instant, now: Instant, period: std::time::Duration) -> Instant {
    if wake_at > now {
        wake_at.min(now + period)
    } else {
        now + period
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_wait_wakes_at_its_time_then_every_period_never_in_the_past() {
        let now = Instant::now();
        let second = Duration::from_secs(1);
        assert_eq!(next_wake(now + Duration::from_millis(300), now, second), now + Duration::from_millis(300));
        assert_eq!(next_wake(now + Duration::from_secs(60), now, second), now + second, "at least every period");
        assert_eq!(next_wake(now - Duration::from_secs(5), now, second), now + second, "a past time is not now");
        assert_eq!(next_wake(now, now, second), now + second);
    }

    fn set(ids: &[&str]) -> HashSet<String> {
        ids.iter().map(|s| s.to_string()).collect()
    }

    /// Three sampled clients (a, b, c), two wanted, a deadline 10 s after `now`.
    struct Fixture {
        sampled: HashSet<String>,
        accepted: HashSet<String>,
        rejected: HashSet<String>,
        connected: HashSet<String>,
        target: usize,
        min_clients: usize,
        now: Instant,
    }

    impl Fixture {
        fn new() -> Self {
            Fixture {
                sampled: set(&["a", "b", "c"]),
                accepted: HashSet::new(),
                rejected: HashSet::new(),
                connected: set(&["a", "b", "c"]),
                target: 3,
                min_clients: 2,
                now: Instant::now(),
            }
        }

        fn view(&self) -> RoundView<'_> {
            RoundView {
                sampled: &self.sampled,
                accepted: &self.accepted,
                rejected: &self.rejected,
                connected: &self.connected,
                target: self.target,
                min_clients: self.min_clients,
                deadline: self.now + Duration::from_secs(10),
            }
        }

        fn close_at(&self, after: Duration) -> Close {
            should_close(&self.view(), self.now + after)
        }

        fn close(&self) -> Close {
            self.close_at(Duration::ZERO)
        }
    }

    #[test]
    fn a_round_starts_with_min_clients_connected() {
        assert!(!should_start(1, 2));
        assert!(should_start(2, 2));
        assert!(!should_start(0, 0), "never a round without clients");
    }

    #[test]
    fn sample_size_follows_the_settings() {
        assert_eq!(sample_size(5, 0, 2, 1.0), SampleSize { target: 5, sampled: 5 }, "0 means everyone");
        assert_eq!(sample_size(5, 2, 2, 1.0), SampleSize { target: 2, sampled: 2 });
        assert_eq!(sample_size(5, 1, 3, 1.0), SampleSize { target: 3, sampled: 3 }, "at least min_clients");
        assert_eq!(sample_size(6, 2, 2, 1.5), SampleSize { target: 2, sampled: 3 }, "over-sampling rounds up");
        assert_eq!(sample_size(3, 2, 2, 4.0), SampleSize { target: 2, sampled: 3 }, "at most all eligible");
        assert_eq!(sample_size(1, 4, 2, 1.0), SampleSize { target: 1, sampled: 1 });
        assert_eq!(sample_size(1000, 100, 2, 1.1), SampleSize { target: 100, sampled: 110 }, "not 111");
        assert_eq!(sample_size(1000, 10, 2, 1.25), SampleSize { target: 10, sampled: 13 }, "12.5 rounds up");
    }

    #[test]
    fn sample_picks_distinct_eligible_clients() {
        let eligible: Vec<String> = (0..10).map(|i| format!("c{i}")).collect();
        let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(7);
        let picked = sample(eligible.clone(), SampleSize { target: 3, sampled: 4 }, &mut rng);
        assert_eq!(picked.len(), 4);
        assert_eq!(picked.iter().collect::<HashSet<_>>().len(), 4);
        assert!(picked.iter().all(|c| eligible.contains(c)));
    }

    #[test]
    fn open_while_clients_work_and_the_deadline_is_ahead() {
        let mut f = Fixture::new();
        assert_eq!(f.close(), Close::Open);
        f.accepted = set(&["a", "b"]);
        assert_eq!(f.close_at(Duration::from_secs(9)), Close::Open, "c is still connected and working");
    }

    #[test]
    fn all_answered_completes_with_enough_updates() {
        let mut f = Fixture::new();
        f.accepted = set(&["a", "b"]);
        f.rejected = set(&["c"]);
        assert_eq!(f.close(), Close::Complete(CloseReason::AllAnswered));
    }

    #[test]
    fn all_answered_retries_with_too_few_good_updates() {
        let mut f = Fixture::new();
        f.accepted = set(&["a"]);
        f.rejected = set(&["b", "c"]);
        assert_eq!(f.close(), Close::Retry(CloseReason::AllAnswered));
    }

    #[test]
    fn deadline_with_enough_updates_completes() {
        let mut f = Fixture::new();
        f.accepted = set(&["a", "b"]);
        assert_eq!(f.close_at(Duration::from_secs(10)), Close::Complete(CloseReason::Deadline));
    }

    #[test]
    fn deadline_without_enough_updates_retries() {
        let mut f = Fixture::new();
        f.accepted = set(&["a"]);
        assert_eq!(f.close_at(Duration::from_secs(10)), Close::Retry(CloseReason::Deadline));
        f.accepted.clear();
        assert_eq!(f.close_at(Duration::from_secs(11)), Close::Retry(CloseReason::Deadline));
    }

    #[test]
    fn over_sampling_closes_once_the_target_is_in() {
        let mut f = Fixture::new();
        f.target = 2;
        f.accepted = set(&["a"]);
        assert_eq!(f.close(), Close::Open);
        f.accepted = set(&["a", "c"]);
        assert_eq!(f.close(), Close::Complete(CloseReason::TargetReached), "b is a straggler");
    }

    #[test]
    fn without_over_sampling_the_target_does_not_close_early() {
        let mut f = Fixture::new();
        f.sampled = set(&["a", "b"]);
        f.target = 2;
        f.accepted = set(&["a"]);
        assert_eq!(f.close(), Close::Open);
    }

    #[test]
    fn every_non_answering_client_gone_closes_with_enough_updates() {
        let mut f = Fixture::new();
        f.accepted = set(&["a", "b"]);
        f.connected = set(&["a", "b"]);
        assert_eq!(f.close(), Close::Complete(CloseReason::StragglersGone));
    }

    #[test]
    fn gone_clients_are_waited_for_while_too_few_updates_are_in() {
        let mut f = Fixture::new();
        f.accepted = set(&["a"]);
        f.connected = set(&["a"]);
        assert_eq!(f.close(), Close::Open, "b or c may reconnect and answer");
        assert_eq!(f.close_at(Duration::from_secs(10)), Close::Retry(CloseReason::Deadline));
    }

    #[test]
    fn some_gone_and_some_working_stays_open() {
        let mut f = Fixture::new();
        f.accepted = set(&["a"]);
        f.connected = set(&["a", "b"]);
        f.min_clients = 1;
        assert_eq!(f.close(), Close::Open, "b is still working");
    }

    #[test]
    fn a_sampled_client_that_reconnects_mid_round_gets_the_task_again() {
        let mut f = Fixture::new();
        f.accepted = set(&["a"]);
        // b dropped its connection: the round waits for it.
        f.connected = set(&["a", "c"]);
        assert_eq!(f.close(), Close::Open);
        // b reconnects: it gets the task again and the round still waits for its update.
        f.connected.insert("b".into());
        assert!(resend_task_on_connect(&f.view(), "b"));
        assert_eq!(f.close(), Close::Open);
        f.accepted.insert("b".into());
        f.accepted.insert("c".into());
        assert_eq!(f.close(), Close::Complete(CloseReason::AllAnswered));
    }

    #[test]
    fn answered_or_unsampled_clients_do_not_get_the_task_on_connect() {
        let mut f = Fixture::new();
        f.accepted = set(&["a"]);
        f.rejected = set(&["b"]);
        assert!(!resend_task_on_connect(&f.view(), "a"));
        assert!(!resend_task_on_connect(&f.view(), "b"));
        assert!(resend_task_on_connect(&f.view(), "c"));
        assert!(!resend_task_on_connect(&f.view(), "z"));
    }

    #[test]
    fn identical_training_failures_of_every_client_are_counted_in_a_row() {
        let sampled: HashSet<String> = ["a", "b"].iter().map(|s| s.to_string()).collect();
        let mut failures = HashMap::new();
        failures.insert("a".to_string(), "non-finite loss".to_string());
        assert_eq!(all_training_failed(&sampled, &failures), None, "b has not failed");
        failures.insert("b".to_string(), "non-finite loss".to_string());
        let why = all_training_failed(&sampled, &failures).unwrap();
        assert_eq!(why, "local training failed on every sampled client: non-finite loss");
        assert_eq!(all_training_failed(&HashSet::new(), &failures), None, "nobody sampled is no failure");
        let mut series = RepeatedFailure::default();
        assert_eq!(series.record(Some(why.clone())), 1);
        assert_eq!(series.record(Some(why.clone())), 2);
        assert_eq!(series.record(Some("other".into())), 1, "a different failure starts a new series");
        assert_eq!(series.record(None), 0, "a straggler's failure ends it");
        assert_eq!(series.record(Some(why)), 1);
    }
}
