//! How a dataset is dealt to clients: IID, Dirichlet over labels, pathological (K classes per
//! client) and natural (by a CSV column). A partition is a list of shards, each a list of row
//! indices into one dataset: shards are disjoint and cover every row, and a seeded partition
//! never changes (the tests pin a digest of each). `fl-client gen-data --partition` and `fl-sim`
//! both deal their rows here.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_distr::{Distribution, Gamma};

/// How rows are split among clients.
#[derive(Clone, Debug, PartialEq)]
pub enum Partition {
    /// Shuffled and dealt evenly.
    Iid,
    /// Per class, shares drawn from a Dirichlet distribution with this concentration (smaller is
    /// more skewed): normalised Gamma(α, 1) draws, one per client.
    Dirichlet(f64),
    /// Each client holds this many classes; each class's rows are dealt evenly among the clients
    /// that hold it (McMahan et al.'s "pathological non-IID").
    Pathological(usize),
    /// One client per distinct value of a column (a user or site id): the values of each row.
    Natural(Vec<String>),
}

/// Why a partition cannot be made.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PartitionError {
    /// No clients asked for.
    #[error("a partition needs at least one client")]
    NoClients,
    /// α must be a positive finite number.
    #[error("--alpha {0}: the Dirichlet concentration must be a positive finite number")]
    BadAlpha(f64),
    /// K must be 1..=classes.
    #[error("--classes-per-client {k}: must be 1..={classes} (the number of classes)")]
    BadClassesPerClient {
        /// Asked for.
        k: usize,
        /// Classes in the data.
        classes: usize,
    },
    /// Some class would belong to no client.
    #[error(
        "{clients} clients × {k} classes each cannot cover {classes} classes: give more clients (fl-sim --clients, gen-data --shards) or more --classes-per-client"
    )]
    ClassesUncovered {
        /// Clients.
        clients: usize,
        /// Classes per client.
        k: usize,
        /// Classes.
        classes: usize,
    },
    /// The draws never gave every client the minimum shard size.
    #[error("no Dirichlet(α {alpha}) draw in {tries} gave every one of {clients} clients at least {min_size} rows (of {rows}): raise --alpha, give more rows or fewer clients")]
    MinSizeUnreachable {
        /// α.
        alpha: f64,
        /// Draws made.
        tries: usize,
        /// Clients.
        clients: usize,
        /// The minimum.
        min_size: usize,
        /// Rows.
        rows: usize,
    },
    /// Fewer rows than clients with a minimum size.
    #[error("{rows} rows cannot give {clients} clients at least {min_size} rows each")]
    TooFewRows {
        /// Rows.
        rows: usize,
        /// Clients.
        clients: usize,
        /// The minimum.
        min_size: usize,
    },
    /// A label index at or above the class count.
    #[error("row {row} has label index {label}, but there are {classes} classes")]
    LabelOutOfRange {
        /// Row index.
        row: usize,
        /// Its label.
        label: usize,
        /// Classes.
        classes: usize,
    },
    /// The natural partition's values do not match the rows.
    #[error("the partition column has {values} values for {rows} rows")]
    ColumnLength {
        /// Values.
        values: usize,
        /// Rows.
        rows: usize,
    },
}

/// Draws a Dirichlet partition this many times at most before giving up on the minimum size.
const MAX_DRAWS: usize = 1000;

/// Splits rows `0..labels.len()` (row `i` has class `labels[i]` of `classes`) into `clients`
/// shards of row indices. Every row lands in exactly one shard. [`Partition::Dirichlet`] redraws
/// until every shard has at least `min_size` rows; the others ignore `min_size`, and
/// [`Partition::Natural`] makes one shard per distinct value (sorted), whatever `clients` says.
pub fn partition_indices(
    labels: &[usize],
    classes: usize,
    clients: usize,
    how: &Partition,
    min_size: usize,
    seed: u64,
) -> Result<Vec<Vec<usize>>, PartitionError> {
    if let Some((row, &label)) = labels.iter().enumerate().find(|(_, &l)| l >= classes) {
        return Err(PartitionError::LabelOutOfRange { row, label, classes });
    }
    if let Partition::Natural(values) = how {
        return natural(values, labels.len());
    }
    if clients == 0 {
        return Err(PartitionError::NoClients);
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut out = vec![Vec::new(); clients];
    match *how {
        Partition::Iid => {
            let mut idx: Vec<usize> = (0..labels.len()).collect();
            idx.shuffle(&mut rng);
            for (i, r) in idx.into_iter().enumerate() {
                out[i % clients].push(r);
            }
        }
        Partition::Dirichlet(alpha) => {
            let gamma = Gamma::new(alpha, 1.0).map_err(|_| PartitionError::BadAlpha(alpha))?;
            if !alpha.is_finite() || alpha <= 0.0 {
                return Err(PartitionError::BadAlpha(alpha));
            }
            if clients * min_size > labels.len() {
                return Err(PartitionError::TooFewRows { rows: labels.len(), clients, min_size });
            }
            let mut tries = 0;
            loop {
                tries += 1;
                out = dirichlet_draw(labels, classes, clients, &gamma, &mut rng);
                if out.iter().all(|s| s.len() >= min_size) {
                    break;
                }
                if tries == MAX_DRAWS {
                    return Err(PartitionError::MinSizeUnreachable {
                        alpha,
                        tries,
                        clients,
                        min_size,
                        rows: labels.len(),
                    });
                }
            }
            for shard in &mut out {
                shard.shuffle(&mut rng);
            }
        }
        Partition::Pathological(k) => {
            if k == 0 || k > classes {
                return Err(PartitionError::BadClassesPerClient { k, classes });
            }
            if clients * k < classes {
                return Err(PartitionError::ClassesUncovered { clients, k, classes });
            }
            // Classes in a random order, dealt round-robin: client c holds order[(c·k + j) mod C].
            let mut order: Vec<usize> = (0..classes).collect();
            order.shuffle(&mut rng);
            let mut holders = vec![Vec::new(); classes];
            for c in 0..clients {
                for j in 0..k {
                    let class = order[(c * k + j) % classes];
                    if !holders[class].contains(&c) {
                        holders[class].push(c);
                    }
                }
            }
            for (class, holders) in holders.iter().enumerate() {
                let mut members: Vec<usize> = (0..labels.len()).filter(|&r| labels[r] == class).collect();
                members.shuffle(&mut rng);
                for (i, r) in members.into_iter().enumerate() {
                    out[holders[i % holders.len()]].push(r);
                }
            }
            for shard in &mut out {
                shard.shuffle(&mut rng);
            }
        }
        Partition::Natural(_) => unreachable!("handled above"),
    }
    Ok(out)
}

/// One Dirichlet draw: each class's rows, shuffled, cut by the normalised Gamma(α) weights.
fn dirichlet_draw(
    labels: &[usize],
    classes: usize,
    clients: usize,
    gamma: &Gamma<f64>,
    rng: &mut rand::rngs::StdRng,
) -> Vec<Vec<usize>> {
    let mut out = vec![Vec::new(); clients];
    for class in 0..classes {
        let mut members: Vec<usize> = (0..labels.len()).filter(|&r| labels[r] == class).collect();
        members.shuffle(rng);
        let weights: Vec<f64> = (0..clients).map(|_| gamma.sample(rng) + 1e-12).collect();
        let total: f64 = weights.iter().sum();
        let mut start = 0usize;
        let mut acc = 0.0;
        for (s, w) in weights.iter().enumerate() {
            acc += w / total;
            let end = if s + 1 == clients { members.len() } else { (acc * members.len() as f64).round() as usize };
            out[s].extend_from_slice(&members[start..end.max(start).min(members.len())]);
            start = end.max(start).min(members.len());
        }
    }
    out
}

/// One shard per distinct value, in sorted order of the values.
fn natural(values: &[String], rows: usize) -> Result<Vec<Vec<usize>>, PartitionError> {
    if values.len() != rows {
        return Err(PartitionError::ColumnLength { values: values.len(), rows });
    }
    let mut groups: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (r, v) in values.iter().enumerate() {
        groups.entry(v.as_str()).or_default().push(r);
    }
    if groups.is_empty() {
        return Err(PartitionError::NoClients);
    }
    Ok(groups.into_values().collect())
}

/// Why a partition column cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum ColumnError {
    /// The file could not be read, or a record is malformed.
    #[error("{path}: {source}")]
    Csv {
        /// The file.
        path: PathBuf,
        /// Why.
        source: csv::Error,
    },
    /// The header has no such column.
    #[error("{path}: line 1: no column '{column}' for --partition-column (found: {found})")]
    Missing {
        /// The file.
        path: PathBuf,
        /// The column.
        column: String,
        /// The header.
        found: String,
    },
    /// An empty value: a row with no owner.
    #[error("{path}: line {line}, field '{column}': empty value (every row needs an owner for --partition natural)")]
    Empty {
        /// The file.
        path: PathBuf,
        /// Line of the record.
        line: u64,
        /// The column.
        column: String,
    },
}

/// The values of `column` in the CSV file `path`, one per data row, for [`Partition::Natural`].
pub fn read_column(path: &Path, column: &str) -> Result<Vec<String>, ColumnError> {
    let csv_err = |source| ColumnError::Csv { path: path.to_path_buf(), source };
    let mut reader = csv::Reader::from_path(path).map_err(csv_err)?;
    let headers = reader.headers().map_err(csv_err)?.clone();
    let index = headers.iter().position(|h| h == column).ok_or_else(|| ColumnError::Missing {
        path: path.to_path_buf(),
        column: column.to_string(),
        found: headers.iter().collect::<Vec<_>>().join(","),
    })?;
    let mut out = Vec::new();
    for record in reader.records() {
        let record = record.map_err(csv_err)?;
        let line = record.position().map_or(0, |p| p.line());
        let value = record.get(index).unwrap_or_default();
        if value.is_empty() {
            return Err(ColumnError::Empty { path: path.to_path_buf(), line, column: column.to_string() });
        }
        out.push(value.to_string());
    }
    Ok(out)
}

/// SHA-256 of a partition (shard sizes and indices, in order): the tests pin it per seed.
pub fn digest(shards: &[Vec<usize>]) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for shard in shards {
        h.update((shard.len() as u64).to_le_bytes());
        for &r in shard {
            h.update((r as u64).to_le_bytes());
        }
    }
    hex::encode(h.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 450 rows over 6 classes, unevenly: class c has 50 + 10·c rows, interleaved.
    fn labels() -> Vec<usize> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        let mut l: Vec<usize> = (0..6).flat_map(|c| std::iter::repeat_n(c, 50 + 10 * c)).collect();
        l.shuffle(&mut rng);
        l
    }

    fn assert_disjoint_and_covering(shards: &[Vec<usize>], rows: usize) {
        let mut seen = vec![false; rows];
        for shard in shards {
            for &r in shard {
                assert!(!seen[r], "row {r} is in two shards");
                seen[r] = true;
            }
        }
        assert!(seen.iter().all(|&s| s), "some row is in no shard");
    }

    fn classes_of(shard: &[usize], labels: &[usize]) -> std::collections::BTreeSet<usize> {
        shard.iter().map(|&r| labels[r]).collect()
    }

    #[test]
    fn every_partitioner_is_disjoint_covering_and_pinned() {
        let labels = labels();
        let users: Vec<String> = (0..labels.len()).map(|r| format!("user-{}", (r * 7) % 13)).collect();
        let cases = [
            (Partition::Iid, "iid"),
            (Partition::Dirichlet(0.5), "dirichlet 0.5"),
            (Partition::Dirichlet(0.1), "dirichlet 0.1"),
            (Partition::Pathological(2), "pathological 2"),
            (Partition::Natural(users), "natural"),
        ];
        let mut digests = Vec::new();
        for (how, name) in &cases {
            let shards = partition_indices(&labels, 6, 10, how, 5, 3).unwrap();
            assert_disjoint_and_covering(&shards, labels.len());
            // The same seed gives the same partition; another seed another (but natural).
            assert_eq!(shards, partition_indices(&labels, 6, 10, how, 5, 3).unwrap(), "{name}");
            if !matches!(how, Partition::Natural(_)) {
                assert_ne!(shards, partition_indices(&labels, 6, 10, how, 5, 4).unwrap(), "{name}");
            }
            digests.push(format!("{name}: {}", digest(&shards)));
        }
        // Pinned: a change here changes every seeded federation's data.
        let pinned = [
            "iid: d032362a1bc42aa0873dda7af5e746622e4c0fd88a9e9a3cc23390bd1762cba1",
            "dirichlet 0.5: 69ff2333f654755a6925fadd944362239df13b9ea9e5dd6c386286fdf132a06d",
            "dirichlet 0.1: 1451e7e1242e7daa8914c32b2ebd65408a04e59e0997f6588d2167ea8a612ad3",
            "pathological 2: 25a9f84688182acebff416932adf03f388a75e21319d5ff2deb7acb156149677",
            "natural: 6ccc0eee3788306c22041b15add84b852cc0818ba73358da159f397042f3464f",
        ];
        assert_eq!(digests, pinned);
    }

    #[test]
    fn shapes_follow_the_scheme() {
        let labels = labels();
        let iid = partition_indices(&labels, 6, 10, &Partition::Iid, 0, 1).unwrap();
        assert!(iid.iter().all(|s| s.len() == 45));
        for k in 1..=3 {
            let shards = partition_indices(&labels, 6, 12, &Partition::Pathological(k), 0, 1).unwrap();
            assert_disjoint_and_covering(&shards, labels.len());
            assert!(shards.iter().all(|s| classes_of(s, &labels).len() == k), "k {k}");
        }
        // Smaller α, more skew: the mean number of classes a client holds drops.
        let mean_classes = |alpha| {
            let shards = partition_indices(&labels, 6, 20, &Partition::Dirichlet(alpha), 1, 2).unwrap();
            shards.iter().map(|s| classes_of(s, &labels).len()).sum::<usize>() as f64 / 20.0
        };
        assert!(mean_classes(0.1) < mean_classes(100.0), "{} vs {}", mean_classes(0.1), mean_classes(100.0));
        assert!(mean_classes(100.0) > 5.5);
        let min = partition_indices(&labels, 6, 20, &Partition::Dirichlet(0.3), 10, 2).unwrap();
        assert!(min.iter().all(|s| s.len() >= 10));
        let natural =
            partition_indices(&labels, 6, 0, &Partition::Natural(vec!["b".into(), "a".into(), "b".into()]), 0, 0);
        assert_eq!(natural, Err(PartitionError::ColumnLength { values: 3, rows: 450 }));
        let natural =
            partition_indices(&[0, 1, 0], 2, 0, &Partition::Natural(vec!["b".into(), "a".into(), "b".into()]), 0, 0);
        assert_eq!(natural.unwrap(), vec![vec![1], vec![0, 2]]);
    }

    #[test]
    fn impossible_partitions_are_refused_with_a_reason() {
        let labels = labels();
        let err = |how, clients, min| partition_indices(&labels, 6, clients, &how, min, 1).unwrap_err().to_string();
        assert!(err(Partition::Dirichlet(0.0), 4, 0).contains("positive"));
        assert!(err(Partition::Dirichlet(0.5), 100, 10).contains("cannot give 100 clients"));
        assert!(err(Partition::Dirichlet(0.01), 50, 6).contains("no Dirichlet"));
        assert!(err(Partition::Pathological(7), 4, 0).contains("1..=6"));
        assert!(err(Partition::Pathological(1), 4, 0).contains("cannot cover 6 classes"));
        assert!(err(Partition::Iid, 0, 0).contains("at least one client"));
        assert_eq!(
            partition_indices(&[0, 3], 2, 1, &Partition::Iid, 0, 0),
            Err(PartitionError::LabelOutOfRange { row: 1, label: 3, classes: 2 })
        );
    }

    #[test]
    fn a_column_is_read_with_its_line_on_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.csv");
        std::fs::write(&path, "text,label,user\nhi,a,u1\nho,b,u2\nha,a,\n").unwrap();
        let e = read_column(&path, "user").unwrap_err().to_string();
        assert!(e.contains("line 4") && e.contains("'user'"), "{e}");
        let e = read_column(&path, "site").unwrap_err().to_string();
        assert!(e.contains("no column 'site'") && e.contains("text,label,user"), "{e}");
        std::fs::write(&path, "text,label,user\nhi,a,u1\nho,b,u2\n").unwrap();
        assert_eq!(read_column(&path, "user").unwrap(), vec!["u1", "u2"]);
    }
}
