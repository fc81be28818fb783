//! Byzantine-robust aggregation: coordinate-wise median and trimmed mean (Yin et al. 2018), Krum
//! and Multi-Krum (Blanchard et al. 2017).
//!
//! They need every update of the round at once. Each folded update is written to its own file
//! in a spool directory (raw little-endian f32, tensors in order); `finish` reads the files back
//! one block of coordinates at a time. Disk use is O(clients × model), memory O(clients × block)
//! plus Krum's n × n distances. The directory is removed when the strategy is dropped.
//!
//! Median and trimmed mean weigh every client alike (an attacker could otherwise claim a huge
//! example count); Multi-Krum averages the updates it keeps weighted by example counts, as
//! Flower does.

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use fl_common::TensorSet;

use super::{AggregationError, AggregationStrategy, ClientUpdate};

/// Coordinates read per file and block: 64 Ki values, 256 KiB.
const BLOCK: usize = 64 * 1024;

/// The robust rule.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RobustRule {
    /// Coordinate-wise median (the mean of the two middle values for an even count).
    Median,
    /// Coordinate-wise mean after dropping the ⌊β·n⌋ smallest and largest values.
    TrimmedMean {
        /// β, per tail, in [0, 0.5).
        beta: f64,
    },
    /// Krum: the update with the smallest sum of squared distances to its n − f − 2 nearest
    /// neighbours. Needs n ≥ 2f + 3.
    Krum {
        /// f, the attackers tolerated.
        byzantine: usize,
    },
    /// Multi-Krum: the mean (weighted by example counts) of the n − f updates with the best Krum
    /// scores. Needs n ≥ 2f + 3.
    MultiKrum {
        /// f.
        byzantine: usize,
    },
}

impl RobustRule {
    /// The fewest updates the rule works with.
    pub fn min_updates(&self) -> usize {
        match self {
            RobustRule::Median | RobustRule::TrimmedMean { .. } => 1,
            RobustRule::Krum { byzantine } | RobustRule::MultiKrum { byzantine } => 2 * byzantine + 3,
        }
    }

    fn name(&self) -> &'static str {
        match self {
            RobustRule::Median => "median",
            RobustRule::TrimmedMean { .. } => "trimmed-mean",
            RobustRule::Krum { .. } => "krum",
            RobustRule::MultiKrum { .. } => "multi-krum",
        }
    }
}

/// Distinguishes the spool directories of the strategies of one process.
static NEXT_SPOOL: AtomicU64 = AtomicU64::new(0);

/// Prefix of the spool directories in `STATE/spool/`; a restart removes leftovers.
pub const SPOOL_PREFIX: &str = "aggregate-";

/// A robust strategy over updates spooled to disk.
#[derive(Debug)]
pub struct RobustAggregator {
    rule: RobustRule,
    dir: PathBuf,
    /// Example counts of the spooled updates, in file order.
    weights: Vec<u64>,
    /// Values per update.
    len: usize,
    /// Tensor names and shapes, from `begin_round`.
    layout: Option<TensorSet>,
}

impl RobustAggregator {
    /// A strategy that spools into a fresh directory under `spool_root` (created on the first fold).
    pub fn new(rule: RobustRule, spool_root: &Path) -> Self {
        let n = NEXT_SPOOL.fetch_add(1, Ordering::Relaxed);
        let dir = spool_root.join(format!("{SPOOL_PREFIX}{}-{n}", std::process::id()));
        RobustAggregator { rule, dir, weights: Vec::new(), len: 0, layout: None }
    }

    fn file(&self, i: usize) -> PathBuf {
        self.dir.join(format!("{i}.f32"))
    }

    fn spool_err(path: &Path) -> impl FnOnce(std::io::Error) -> AggregationError + '_ {
        move |source| AggregationError::Spool { path: path.to_path_buf(), source }
    }

    /// Reads coordinates `start..start + out.len() / n` of every update into `out`, update-major.
    fn read_block(
        &self,
        start: usize,
        width: usize,
        out: &mut [f32],
        bytes: &mut Vec<u8>,
    ) -> Result<(), AggregationError> {
        bytes.resize(width * 4, 0);
        for i in 0..self.weights.len() {
            let path = self.file(i);
            let file = std::fs::File::open(&path).map_err(Self::spool_err(&path))?;
            file.read_exact_at(bytes, (start * 4) as u64).map_err(Self::spool_err(&path))?;
            for (o, b) in out[i * width..(i + 1) * width].iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        Ok(())
    }

    /// The aggregate delta, flat, by the coordinate-wise rule `per_coordinate`.
    fn coordinate_wise(&self, per_coordinate: impl Fn(&mut [f32]) -> f32) -> Result<Vec<f32>, AggregationError> {
        let n = self.weights.len();
        let mut out = Vec::with_capacity(self.len);
        let (mut block, mut column, mut bytes) = (vec![0f32; n * BLOCK], vec![0f32; n], Vec::new());
        for start in (0..self.len).step_by(BLOCK) {
            let width = BLOCK.min(self.len - start);
            self.read_block(start, width, &mut block[..n * width], &mut bytes)?;
            for j in 0..width {
                for (i, c) in column.iter_mut().enumerate() {
                    *c = block[i * width + j];
                }
                out.push(per_coordinate(&mut column));
            }
        }
        Ok(out)
    }

    /// Krum scores: for each update, the sum of squared distances to its n − f − 2 nearest.
    fn krum_scores(&self, byzantine: usize) -> Result<Vec<f64>, AggregationError> {
        let n = self.weights.len();
        let mut dist = vec![0f64; n * n];
        let (mut block, mut bytes) = (vec![0f32; n * BLOCK], Vec::new());
        for start in (0..self.len).step_by(BLOCK) {
            let width = BLOCK.min(self.len - start);
            self.read_block(start, width, &mut block[..n * width], &mut bytes)?;
            for i in 0..n {
                for k in i + 1..n {
                    let (a, b) = (&block[i * width..(i + 1) * width], &block[k * width..(k + 1) * width]);
                    let d: f64 = a.iter().zip(b).map(|(x, y)| f64::from(x - y).powi(2)).sum();
                    dist[i * n + k] += d;
                    dist[k * n + i] += d;
                }
            }
        }
        let neighbours = n - byzantine - 2;
        Ok((0..n)
            .map(|i| {
                let mut row: Vec<f64> = (0..n).filter(|&k| k != i).map(|k| dist[i * n + k]).collect();
                row.sort_by(f64::total_cmp);
                row[..neighbours].iter().sum()
            })
            .collect())
    }

    /// The mean of the updates `chosen`, weighted by example counts, flat.
    fn weighted_mean(&self, chosen: &[usize]) -> Result<Vec<f32>, AggregationError> {
        let total: f64 = chosen.iter().map(|&i| self.weights[i] as f64).sum();
        let mut out = vec![0f64; self.len];
        let mut bytes = vec![0u8; BLOCK * 4];
        for &i in chosen {
            let path = self.file(i);
            let file = std::fs::File::open(&path).map_err(Self::spool_err(&path))?;
            let w = self.weights[i] as f64 / total;
            for start in (0..self.len).step_by(BLOCK) {
                let width = BLOCK.min(self.len - start);
                file.read_exact_at(&mut bytes[..width * 4], (start * 4) as u64).map_err(Self::spool_err(&path))?;
                for (o, b) in out[start..start + width].iter_mut().zip(bytes.chunks_exact(4)) {
                    *o += w * f64::from(f32::from_le_bytes([b[0], b[1], b[2], b[3]]));
                }
            }
        }
        Ok(out.into_iter().map(|x| x as f32).collect())
    }
}

/// The median of `values` (reordered).
pub fn median(values: &mut [f32]) -> f32 {
    let n = values.len();
    values.sort_unstable_by(f32::total_cmp);
    if n % 2 == 1 {
        values[n / 2]
    } else {
        ((f64::from(values[n / 2 - 1]) + f64::from(values[n / 2])) / 2.0) as f32
    }
}

/// The mean of `values` (reordered) without the ⌊β·n⌋ smallest and largest.
pub fn trimmed_mean(values: &mut [f32], beta: f64) -> f32 {
    let n = values.len();
    let k = ((beta * n as f64).floor() as usize).min((n - 1) / 2);
    values.sort_unstable_by(f32::total_cmp);
    let kept = &values[k..n - k];
    (kept.iter().map(|&x| f64::from(x)).sum::<f64>() / kept.len() as f64) as f32
}

impl AggregationStrategy for RobustAggregator {
    fn begin_round(&mut self, global: &TensorSet) {
        self.layout = Some(global.zeros_like());
        self.len = global.num_values();
        self.weights.clear();
    }

    fn fold(&mut self, update: ClientUpdate<'_>) {
        if let Err(e) = self.try_fold(update) {
            panic!("spooling an update: {e}");
        }
    }

    fn finish(&mut self, global: &TensorSet) -> Option<TensorSet> {
        match self.try_finish(global) {
            Ok(next) => next,
            Err(e) => panic!("robust aggregation: {e}"),
        }
    }

    fn try_fold(&mut self, update: ClientUpdate<'_>) -> Result<(), AggregationError> {
        std::fs::create_dir_all(&self.dir).map_err(Self::spool_err(&self.dir))?;
        let path = self.file(self.weights.len());
        let write = || -> std::io::Result<()> {
            let mut file = std::io::BufWriter::new(std::fs::File::create(&path)?);
            for t in &update.delta.tensors {
                for x in &t.data {
                    file.write_all(&x.to_le_bytes())?;
                }
            }
            file.into_inner().map_err(|e| e.into_error())?.sync_data()
        };
        write().map_err(Self::spool_err(&path))?;
        // Counted only once the whole file is there: a failed fold leaves the state as it was.
        self.weights.push(update.num_examples);
        Ok(())
    }

    fn try_finish(&mut self, global: &TensorSet) -> Result<Option<TensorSet>, AggregationError> {
        let n = self.weights.len();
        if n == 0 {
            return Ok(None);
        }
        if n < self.rule.min_updates() {
            return Err(AggregationError::TooFewUpdates {
                strategy: self.rule.name(),
                needed: self.rule.min_updates(),
                got: n,
            });
        }
        let flat = match self.rule {
            RobustRule::Median => self.coordinate_wise(median)?,
            RobustRule::TrimmedMean { beta } => self.coordinate_wise(|c| trimmed_mean(c, beta))?,
            RobustRule::Krum { byzantine } => {
                let scores = self.krum_scores(byzantine)?;
                let best = (0..n).min_by(|&a, &b| scores[a].total_cmp(&scores[b])).expect("n > 0");
                self.weighted_mean(&[best])?
            }
            RobustRule::MultiKrum { byzantine } => {
                let scores = self.krum_scores(byzantine)?;
                let mut order: Vec<usize> = (0..n).collect();
                order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
                order.truncate(n - byzantine);
                order.sort_unstable();
                self.weighted_mean(&order)?
            }
        };
        let mut next = global.clone();
        let mut values = flat.into_iter();
        for t in &mut next.tensors {
            for (x, d) in t.data.iter_mut().zip(&mut values) {
                *x += d;
            }
        }
        Ok(Some(next))
    }
}

impl Drop for RobustAggregator {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!("could not remove {}: {e}", self.dir.display());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregation::FedAvg;
    use fl_common::NamedTensor;
    use proptest::prelude::*;

    fn tensors(values: &[f32]) -> TensorSet {
        TensorSet::new(vec![NamedTensor { name: "w".into(), shape: vec![values.len()], data: values.to_vec() }])
    }

    fn aggregate(rule: RobustRule, updates: &[Vec<f32>]) -> Vec<f32> {
        let dir = tempfile::tempdir().unwrap();
        let global = tensors(&vec![0.0; updates[0].len()]);
        let mut s = RobustAggregator::new(rule, dir.path());
        s.begin_round(&global);
        for u in updates {
            s.try_fold(ClientUpdate { delta: &tensors(u), num_examples: 1 }).unwrap();
        }
        let out = s.try_finish(&global).unwrap().unwrap().tensors[0].data.clone();
        let spool = s.dir.clone();
        assert!(spool.exists());
        drop(s);
        assert!(!spool.exists(), "the spool directory is removed with the strategy");
        out
    }

    #[test]
    fn trimmed_mean_of_the_issue_example_is_2() {
        let updates: Vec<Vec<f32>> = [-100.0, 1.0, 2.0, 3.0, 100.0].iter().map(|&x| vec![x]).collect();
        assert_eq!(aggregate(RobustRule::TrimmedMean { beta: 0.2 }, &updates), vec![2.0]);
        assert_eq!(trimmed_mean(&mut [-100.0, 1.0, 2.0, 3.0, 100.0], 0.2), 2.0);
    }

    #[test]
    fn median_is_coordinate_wise() {
        let updates = vec![vec![1.0, -5.0], vec![100.0, 0.0], vec![2.0, 7.0], vec![-3.0, 1.0]];
        // Even count: mean of the middle two.
        assert_eq!(aggregate(RobustRule::Median, &updates), vec![1.5, 0.5]);
    }

    #[test]
    fn krum_picks_an_honest_update_and_multi_krum_drops_the_attackers() {
        // 5 honest updates near (1, 1), 2 attackers far away: n = 7 ≥ 2·2 + 3.
        let mut updates: Vec<Vec<f32>> =
            vec![vec![1.0, 1.0], vec![1.1, 0.9], vec![0.9, 1.1], vec![1.05, 1.0], vec![0.95, 0.95]];
        updates.push(vec![-50.0, -50.0]);
        updates.push(vec![40.0, -60.0]);
        let krum = aggregate(RobustRule::Krum { byzantine: 2 }, &updates);
        assert!(updates[..5].contains(&krum), "krum chose {krum:?}");
        let multi = aggregate(RobustRule::MultiKrum { byzantine: 2 }, &updates);
        let honest_mean = [1.0, 0.99];
        for (got, want) in multi.iter().zip(honest_mean) {
            assert!((got - want).abs() < 1e-6, "{multi:?}");
        }
    }

    #[test]
    fn krum_refuses_too_few_updates() {
        let dir = tempfile::tempdir().unwrap();
        let global = tensors(&[0.0]);
        let mut s = RobustAggregator::new(RobustRule::Krum { byzantine: 1 }, dir.path());
        s.begin_round(&global);
        for x in [1.0, 2.0, 3.0, 4.0] {
            s.try_fold(ClientUpdate { delta: &tensors(&[x]), num_examples: 1 }).unwrap();
        }
        let err = s.try_finish(&global).unwrap_err();
        assert!(err.to_string().contains("krum needs at least 5 updates, got 4"), "{err}");
    }

    #[test]
    fn blocks_cover_a_model_larger_than_one_block() {
        // Three tensors spanning block boundaries: the median of three shifted copies is the middle one.
        let dir = tempfile::tempdir().unwrap();
        let make = |shift: f32| {
            TensorSet::new(vec![
                NamedTensor {
                    name: "a".into(),
                    shape: vec![BLOCK + 3],
                    data: (0..BLOCK + 3).map(|i| i as f32 + shift).collect(),
                },
                NamedTensor { name: "b".into(), shape: vec![5], data: vec![shift; 5] },
            ])
        };
        let global = make(0.0).zeros_like();
        let mut s = RobustAggregator::new(RobustRule::Median, dir.path());
        s.begin_round(&global);
        for shift in [10.0, -1.0, 0.5] {
            s.try_fold(ClientUpdate { delta: &make(shift), num_examples: 1 }).unwrap();
        }
        assert_eq!(s.try_finish(&global).unwrap().unwrap(), make(0.5));
    }

    proptest! {
        #[test]
        fn multi_krum_with_f_0_and_trimmed_mean_with_beta_0_are_the_mean(
            updates in proptest::collection::vec(proptest::collection::vec(-10f32..10.0, 3), 3..8),
        ) {
            let global = tensors(&[0.0; 3]);
            let mut avg = FedAvg::default();
            avg.begin_round(&global);
            for u in &updates {
                avg.fold(ClientUpdate { delta: &tensors(u), num_examples: 1 });
            }
            let mean = avg.finish(&global).unwrap().tensors[0].data.clone();
            for rule in [RobustRule::MultiKrum { byzantine: 0 }, RobustRule::TrimmedMean { beta: 0.0 }] {
                let got = aggregate(rule, &updates);
                for (g, m) in got.iter().zip(&mean) {
                    prop_assert!((g - m).abs() < 1e-4, "{rule:?}: {got:?} vs {mean:?}");
                }
            }
        }
    }
}
