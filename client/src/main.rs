//! `fl-client`: enroll with a coordinator, serve federated rounds, train centrally, predict and
//! explain, generate data.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use fl_client::daemon::{self, DaemonConfig, DaemonExit, PersonalConfig};
use fl_client::identity::ClientState;
use fl_common::cli::parse;
use fl_common::compact::Precision;
use fl_common::prune::PruneScope;
use fl_common::{ModelKind, SpecOverrides};
use fl_model::central::{
    default_train_config, split_validation, train_central, train_student, CentralConfig, Progress, Teacher,
};
use fl_model::data::{read_labelled_csv, read_unlabelled_csv};
use fl_model::datagen::{partition, write_csv, GeneratorConfig, Partition, TextGenerator};
use fl_model::edge::{drop_untouched_rows, export, ExportOptions};
use fl_model::embed::{embed, write_points_csv};
use fl_model::explain::{describe_attention, describe_explanation, explain, Method};
use fl_model::model::{default_device, Classifier};
use fl_model::personal::Personalization;
use fl_model::predict::{describe_prediction, evaluate_rows};
use fl_model::report::render_report;
use fl_model::rules::{extract_rules, RulesConfig};
use fl_model::train::{Distillation, OptimizerKind};
use indicatif::{ProgressBar, ProgressStyle};
use tokio_util::sync::CancellationToken;

#[derive(Parser, Debug)]
#[command(name = "fl-client", version, about = "Federated learning client: enroll, train on local data, predict")]
struct Cli {
    #[command(flatten)]
    pretrained: fl_common::PretrainedArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Enroll with a coordinator using a join token; stores key, certificate and CA in the state dir.
    Enroll {
        /// Coordinator URL, https://HOST:PORT.
        #[arg(long, env = "FL_COORDINATOR")]
        coordinator: String,
        /// Join token printed by the coordinator.
        #[arg(long, env = "FL_TOKEN", hide_env_values = true)]
        token: String,
        /// Directory for this client's identity.
        #[arg(long, env = "FL_STATE_DIR")]
        state_dir: PathBuf,
        /// Name shown to the coordinator's operator.
        #[arg(long, env = "FL_NAME")]
        name: Option<String>,
        /// Replace an identity already in --state-dir; the coordinator revokes the old client id.
        #[arg(long)]
        force: bool,
    },
    /// Serve federated rounds: train on the local CSV and send back weight deltas.
    Run {
        /// Coordinator URL, https://HOST:PORT.
        #[arg(long, env = "FL_COORDINATOR")]
        coordinator: String,
        /// Directory holding the identity from `enroll`.
        #[arg(long, env = "FL_STATE_DIR")]
        state_dir: PathBuf,
        /// Local labelled CSV (`text,label`); it never leaves this machine.
        #[arg(long, env = "FL_DATA")]
        data: PathBuf,
        /// Name shown to the coordinator's operator (default: the enrollment name).
        #[arg(long, env = "FL_NAME")]
        name: Option<String>,
        /// Threads for training (libtorch's intra-op threads) and for encoding updates (default:
        /// all cores).
        #[arg(long, env = "FL_THREADS", value_parser = parse::int_in(1i32, 1024))]
        threads: Option<i32>,
        /// Longest wait between reconnection attempts, in seconds.
        #[arg(long, default_value_t = 30.0, value_parser = parse::seconds(3600.0))]
        max_backoff: f64,
        /// Keep a personal model in STATE/personal: finetune (the global model fine-tuned
        /// locally), fedper (the classifier head stays local) or ditto (a personal model pulled
        /// towards the global one). Holds out --local-test-fraction of the data to measure it.
        #[arg(long, value_enum, env = "FL_PERSONALIZE")]
        personalize: Option<PersonalizeArg>,
        /// Ditto's λ: the pull of the personal model towards the global one (0: local only).
        #[arg(long, default_value_t = 10.0, env = "FL_DITTO_LAMBDA", value_parser = parse::float_in(0.0, 1e6))]
        ditto_lambda: f64,
        /// Ditto's personal step: at least this many optimizer steps a round (whole epochs over
        /// the local data), so that a client whose data is one batch still trains its personal
        /// model.
        #[arg(long, default_value_t = 20, env = "FL_DITTO_MIN_STEPS", value_parser = parse::int_in(1u32, 1_000_000))]
        ditto_min_steps: u32,
        /// With --personalize: fraction of the local data held out (never trained on) to compare
        /// the personal and the global model.
        #[arg(long, default_value_t = 0.2, env = "FL_LOCAL_TEST_FRACTION", value_parser = parse::positive(0.99))]
        local_test_fraction: f64,
        /// With --personalize finetune: once the federation has finished, fine-tune the final
        /// model on the local data for this many epochs (the last round's learning rate, batch
        /// size and optimizer); it becomes the personal model [default: 1].
        #[arg(long, env = "FL_FINETUNE_EPOCHS", value_parser = parse::int_in(1u32, 1000))]
        finetune_epochs: Option<u32>,
        /// With --personalize finetune: before that fine-tuning, shift the final model's logits
        /// from a uniform class prior to this client's own (its training labels' frequencies,
        /// each count plus one), by Bayes' rule; `false` fine-tunes the final model as it is
        /// [default: true].
        #[arg(long, action = clap::ArgAction::Set, env = "FL_LOCAL_PRIOR")]
        local_prior: Option<bool>,
        /// TEST TOOL: send a poisoned update every round, to test the coordinator's robust
        /// strategies: sign-flip:SCALE (−SCALE × the delta), scale:FACTOR, or noise:STD (Gaussian
        /// noise added to every coordinate). Never use it in a real federation.
        #[arg(long, value_name = "ATTACK")]
        attack: Option<fl_client::attack::Attack>,
        /// Compress update uploads on the wire, and ask for model downloads compressed: gzip or
        /// zstd (the coordinator compresses only in an encoding its --compression lists), or
        /// none. See BENCHMARKS.md "Transport compression" for when it pays.
        #[arg(long, env = "FL_COMPRESSION", value_enum, default_value = "none")]
        compression: fl_common::tls::Compression,
    },
    /// Predict with a model file: texts, or accuracy and confusion matrix on a labelled CSV;
    /// optionally explain each prediction.
    Predict {
        /// Model file (safetensors with metadata), e.g. STATE/model/final.safetensors.
        #[arg(long, required_unless_present = "personal", conflicts_with = "personal")]
        model: Option<PathBuf>,
        /// Use this client's personal model (from `run --personalize`), in --state-dir.
        #[arg(long, requires = "state_dir")]
        personal: bool,
        /// The client's state directory (with --personal).
        #[arg(long, env = "FL_STATE_DIR")]
        state_dir: Option<PathBuf>,
        /// Text to classify (repeat for several).
        #[arg(long, conflicts_with = "data", required_unless_present = "data")]
        text: Vec<String>,
        /// Labelled CSV to evaluate (with --explain: explain every row, then evaluate).
        #[arg(long)]
        data: Option<PathBuf>,
        /// Print the words that pushed each prediction most towards and away from its label.
        #[arg(long)]
        explain: bool,
        /// Explanation method: occlusion (probability drop when the word is removed) or ig
        /// (integrated gradients on the embeddings).
        #[arg(long, value_enum, default_value_t = MethodArg::Occlusion, requires = "explain")]
        method: MethodArg,
        /// Integrated-gradients steps (more is more exact; --method ig).
        #[arg(long, default_value_t = 64, requires = "explain", value_parser = parse::int_in(1usize, 100_000))]
        steps: usize,
        /// Words shown on each side.
        #[arg(long, default_value_t = 5, requires = "explain", value_parser = parse::int_in(1usize, 10_000))]
        top: usize,
        /// Transformer only: print the last layer's attention weights, averaged over heads.
        #[arg(long)]
        attention: bool,
    },
    /// Train a model centrally on one labelled CSV, with the same code as a federated round: the
    /// centralized baseline, or a starting model for `fl-coordinator serve --init-model`.
    Train {
        /// Labelled CSV (`text,label`).
        #[arg(long)]
        data: PathBuf,
        /// Architecture: fasttext, bilstm or transformer.
        #[arg(long, default_value = "fasttext")]
        model: ModelKind,
        /// Where to write the model file.
        #[arg(long)]
        out: PathBuf,
        /// Passes over the training rows [default: per architecture].
        #[arg(long, value_parser = parse::int_in(1u32, 100_000))]
        epochs: Option<u32>,
        /// Learning rate [default: per architecture].
        #[arg(long, value_parser = parse::positive(100.0))]
        lr: Option<f64>,
        /// Examples per step.
        #[arg(long, value_parser = parse::int_in(1u32, 1_000_000))]
        batch_size: Option<u32>,
        /// Optimizer: adam or sgd.
        #[arg(long, default_value = "adam")]
        optimizer: OptimizerKind,
        /// Fraction of the rows held out for validation.
        #[arg(long, default_value_t = 0.1, value_parser = parse::float_below(0.0, 1.0))]
        validation: f64,
        /// Write the weights after the last epoch instead of those of the epoch with the best
        /// validation accuracy.
        #[arg(long)]
        keep_last: bool,
        /// Labels in output order, comma-separated [default: the CSV's labels, sorted].
        #[arg(long, value_delimiter = ',')]
        labels: Option<Vec<String>>,
        /// libtorch intra-op threads (default: all cores).
        #[arg(long, env = "FL_THREADS", value_parser = parse::int_in(1i32, 1024))]
        threads: Option<i32>,
        /// Seed of the weights, the split, the shuffling and dropout.
        #[arg(long, default_value_t = 42)]
        seed: u64,
        #[command(flatten)]
        arch: SpecOverrides,
    },
    /// Distill a teacher model into a (smaller) student: the student trains on the labels mixed
    /// with the teacher's softened outputs (Hinton et al.), keeps its best validation epoch, and
    /// is compared with the teacher on the rows held out.
    Distill {
        /// The teacher model file (any architecture; plain or compact).
        #[arg(long)]
        teacher: PathBuf,
        /// The student's architecture.
        #[arg(long, default_value = "fasttext")]
        student_model: ModelKind,
        /// Labelled CSV (`text,label`) with the teacher's labels.
        #[arg(long)]
        data: PathBuf,
        /// CSV with a `text` column: more texts, which the student learns from the teacher alone.
        #[arg(long)]
        unlabeled: Option<PathBuf>,
        /// Temperature T that softens the teacher's outputs (1 = as they are).
        #[arg(long, default_value_t = 2.0, value_parser = parse::positive(1000.0))]
        temperature: f64,
        /// Weight of the labels' loss in [0, 1]; the rest goes to matching the teacher.
        #[arg(long, default_value_t = 0.5, value_parser = parse::float_in(0.0, 1.0))]
        alpha: f64,
        /// Where to write the student's model file.
        #[arg(long)]
        out: PathBuf,
        /// Passes over the training rows [default: per architecture].
        #[arg(long, value_parser = parse::int_in(1u32, 100_000))]
        epochs: Option<u32>,
        /// Learning rate [default: per architecture].
        #[arg(long, value_parser = parse::positive(100.0))]
        lr: Option<f64>,
        /// Fraction of the labelled rows held out for validation.
        #[arg(long, default_value_t = 0.1, value_parser = parse::float_below(0.0, 1.0))]
        validation: f64,
        /// libtorch intra-op threads (default: all cores).
        #[arg(long, env = "FL_THREADS", value_parser = parse::int_in(1i32, 1024))]
        threads: Option<i32>,
        /// Seed of the weights, the split, the shuffling and dropout.
        #[arg(long, default_value_t = 42)]
        seed: u64,
        #[command(flatten)]
        arch: SpecOverrides,
    },
    /// Shrink a model for an edge box: int8 or f16 weights, pruned, in a compact file that
    /// `predict` reads directly; or, with --merge, fold a minilm model's adapters into its base
    /// as one standalone file. Prints sizes, weights kept and, with --data, accuracy.
    Export {
        /// Model file to shrink (e.g. STATE/model/final.safetensors).
        #[arg(long)]
        model: PathBuf,
        /// Where to write the compact model file.
        #[arg(long)]
        out: PathBuf,
        /// Precision of the weight matrices; biases and norms stay f32.
        #[arg(long, value_enum, default_value_t = QuantizeArg::Int8)]
        quantize: QuantizeArg,
        /// Fraction of the weights with the smallest magnitude to drop, in [0, 1).
        #[arg(long, default_value_t = 0.0, value_parser = parse::float_below(0.0, 1.0))]
        prune: f64,
        /// Where the pruning threshold is taken: in each weight matrix, or over all of them.
        #[arg(long, value_enum, default_value_t = ScopeArg::Tensor)]
        prune_scope: ScopeArg,
        /// Drop the --prune fraction of embedding rows with the smallest norm (buckets that
        /// training never or barely moved) instead of single weights; other layers stay whole.
        #[arg(long)]
        prune_rows: bool,
        /// Also drop the embedding rows still equal to this model's: the federation's initial
        /// model (STATE/model/initial.safetensors), so the buckets no client ever touched.
        #[arg(long)]
        untouched_from: Option<PathBuf>,
        /// Labelled CSV to measure the accuracy before and after.
        #[arg(long)]
        data: Option<PathBuf>,
        /// minilm: fold each LoRA adapter into the base (W + alpha/rank B A) and write one f32
        /// model file with the base, the head and the tokenizer, which needs no base package.
        #[arg(long, conflicts_with_all = ["quantize", "prune", "prune_scope", "prune_rows", "untouched_from"])]
        merge: bool,
    },
    /// What the model looks for in each class: its strongest n-grams (fastText) or words
    /// (sequence models) with precision and coverage, and a short ordered rule list imitating it,
    /// with its fidelity to the model and its accuracy on held-out rows.
    Rules {
        /// Model file.
        #[arg(long)]
        model: PathBuf,
        /// Labelled CSV: the n-grams and rules come from it, and part of it is held out to measure them.
        #[arg(long)]
        data: PathBuf,
        /// Labelled CSV to measure the rules on, instead of holding out part of --data.
        #[arg(long)]
        test: Option<PathBuf>,
        /// Fraction of --data held out to measure the rules (without --test).
        #[arg(long, default_value_t = 0.3, value_parser = parse::float_below(0.0, 1.0))]
        holdout: f64,
        /// N-grams listed per class, and the most rules per class.
        #[arg(long, default_value_t = 10, value_parser = parse::int_in(1usize, 10_000))]
        per_class: usize,
        /// Least precision of a rule on the rows it is the first to match (0 to 1).
        #[arg(long, default_value_t = 0.7, value_parser = parse::float_in(0.0, 1.0))]
        min_precision: f64,
        /// Least number of rows an n-gram or a rule must cover.
        #[arg(long, default_value_t = 5, value_parser = parse::int_in(1usize, 10_000_000))]
        min_support: usize,
        /// Output format.
        #[arg(long, value_enum, default_value_t = FormatArg::Text)]
        format: FormatArg,
        /// Seed of the held-out split.
        #[arg(long, default_value_t = 42)]
        seed: u64,
    },
    /// Write 2-D coordinates of each text's pooled representation (PCA), with label and
    /// prediction, as CSV for plotting.
    Embed {
        /// Model file.
        #[arg(long)]
        model: PathBuf,
        /// Labelled CSV.
        #[arg(long)]
        data: PathBuf,
        /// Where to write the points (`x,y,label,predicted,text`).
        #[arg(long)]
        out: PathBuf,
    },
    /// Write one self-contained HTML page about a model on a labelled CSV: confusion matrix, rule
    /// list, embedding scatter and per-class top n-grams. It fetches nothing when opened.
    Report {
        /// Model file.
        #[arg(long)]
        model: PathBuf,
        /// Labelled CSV (the rules are built on 70 % of it and measured on the rest).
        #[arg(long)]
        data: PathBuf,
        /// Where to write the page.
        #[arg(long)]
        out: PathBuf,
        /// N-grams listed per class, and the most rules per class.
        #[arg(long, default_value_t = 10, value_parser = parse::int_in(1usize, 10_000))]
        per_class: usize,
        /// Most rows drawn in the scatter plot (an even sample of the data).
        #[arg(long, default_value_t = 2000, value_parser = parse::int_in(1usize, 10_000_000))]
        max_points: usize,
    },
    /// Generate a labelled text dataset (train, eval, test and per-client shards).
    GenData {
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        /// Training rows (split into shards).
        #[arg(long, default_value_t = 6700, value_parser = parse::int_in(1usize, 10_000_000))]
        rows: usize,
        /// Rows of eval.csv (for the coordinator).
        #[arg(long, default_value_t = 1000, value_parser = parse::int_in(1usize, 10_000_000))]
        eval_rows: usize,
        /// Rows of test.csv.
        #[arg(long, default_value_t = 1000, value_parser = parse::int_in(1usize, 10_000_000))]
        test_rows: usize,
        /// Number of classes (2 to 16).
        #[arg(long, default_value_t = 10, value_parser = parse::int_in(2usize, 16))]
        classes: usize,
        /// Number of client shards (shard-1.csv ...).
        #[arg(long, default_value_t = 3, value_parser = parse::int_in(1usize, 10_000))]
        shards: usize,
        /// How rows are dealt to the shards.
        #[arg(long, value_enum, default_value_t = PartitionArg::Iid)]
        partition: PartitionArg,
        /// Dirichlet concentration (smaller is more skewed).
        #[arg(long, default_value_t = 0.5, value_parser = parse::positive(1e6))]
        alpha: f64,
        /// Classes per shard of `--partition pathological`.
        #[arg(long, default_value_t = 2, value_parser = parse::int_in(1usize, 16))]
        classes_per_client: usize,
        /// Probability that a content word of a sentence is a word of the row's topic (lower is harder).
        #[arg(long, default_value_t = GeneratorConfig::default().signal, value_parser = parse::positive(1.0))]
        signal: f64,
        /// Seed.
        #[arg(long, default_value_t = 7)]
        seed: u64,
    },
}

/// `--method` of `predict --explain`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum MethodArg {
    /// Probability drop when the word is removed.
    Occlusion,
    /// Integrated gradients on the embeddings (`--steps`).
    #[value(alias = "integrated-gradients")]
    Ig,
}

/// `--quantize` of `export`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum QuantizeArg {
    /// 8-bit integers with one scale per row: a quarter of the size.
    Int8,
    /// Half precision: half the size.
    F16,
    /// Keep f32 (pruning only).
    None,
}

/// `--prune-scope` of `export`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum ScopeArg {
    /// The same fraction of each weight matrix.
    Tensor,
    /// One magnitude threshold over all weight matrices.
    Global,
}

/// `--personalize` of `run`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum PersonalizeArg {
    /// Fine-tune the global model on the local data.
    Finetune,
    /// Keep the classifier head local, share the body.
    Fedper,
    /// A personal model pulled towards the global one (--ditto-lambda).
    Ditto,
}

/// `--format` of `rules`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum FormatArg {
    /// For a terminal.
    Text,
    /// One JSON object.
    Json,
}

/// `--partition` of `gen-data`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum PartitionArg {
    /// Shuffled and dealt evenly.
    Iid,
    /// Per class, shares drawn from a Dirichlet distribution (`--alpha`).
    Dirichlet,
    /// `--classes-per-client` classes per shard.
    Pathological,
}

fn main() -> ExitCode {
    fl_common::cli::init();
    match real_main(Cli::parse()) {
        Ok(code) => code,
        // Retrying cannot fix a refused identity or data that does not fit the federation:
        // a distinct status lets supervisors stop restarting (systemd RestartPreventExitStatus=2).
        Err(e) => fl_common::cli::report_error(&e, is_permanent),
    }
}

/// Errors of this binary that retrying cannot fix (exit 2), beside those `fl_common::cli` knows.
fn is_permanent(e: &(dyn std::error::Error + 'static)) -> bool {
    use fl_model::model::ModelError;
    e.is::<daemon::FatalError>()
        || e.is::<fl_model::data::DataError>()
        || e.is::<fl_common::SpecError>()
        || e.is::<fl_common::token::TokenParseError>()
        || matches!(
            e.downcast_ref::<ModelError>(),
            Some(ModelError::Invalid { .. } | ModelError::Spec(_) | ModelError::NonFinite { .. })
        )
}

/// `export --merge`: the minilm `model` with its adapters folded into its base, as one standalone
/// model file `out`; a model of another kind is refused (exit 2) before anything is written.
fn export_merged(model: &Path, out: &Path, data: Option<&Path>) -> Result<ExitCode> {
    let rows_data = data.map(read_labelled_csv).transpose()?;
    let before_size = std::fs::metadata(model).with_context(|| format!("reading {}", model.display()))?.len();
    let original = Classifier::load(model, tch::Device::Cpu)?;
    let merged = fl_model::edge::merge(&original)
        .map_err(|e| fl_common::cli::Permanent::error(format!("export --merge {}: {e}", model.display())))?;
    fl_common::files::write_atomic(out, &merged.bytes, 0o644).with_context(|| format!("writing {}", out.display()))?;
    // Read back what was written: a file that would not load is an error here, not on the edge box.
    let standalone = Classifier::load(out, tch::Device::Cpu)?;
    let rows = [
        ("format", "adapters + head".to_string(), "merged, f32".to_string(), String::new()),
        ("base", "needs the package".to_string(), "in the file".to_string(), String::new()),
        (
            "file size",
            megabytes(before_size),
            megabytes(merged.bytes.len() as u64),
            format!("({:.1} times the size)", merged.bytes.len() as f64 / before_size.max(1) as f64),
        ),
        (
            "parameters",
            original.num_parameters().to_string(),
            merged.parameters.to_string(),
            format!("({} adapters folded in)", merged.adapters),
        ),
    ];
    print_export_table(
        20,
        &rows,
        rows_data.as_ref().zip(data).map(|(rows, path)| (&original, &standalone, rows, path)),
    )?;
    println!("wrote {} (standalone: predict reads no --pretrained base)", out.display());
    Ok(ExitCode::SUCCESS)
}

/// `bytes` as megabytes, for `export`'s table.
fn megabytes(bytes: u64) -> String {
    format!("{:.2} MB", bytes as f64 / 1e6)
}

/// Prints `export`'s before/after table, columns `width` wide: one line per `(row, before,
/// after, note)`, then the accuracy of the original and the exported model on labelled rows
/// (read from `path`) when given.
fn print_export_table(
    width: usize,
    rows: &[(&str, String, String, String)],
    accuracy: Option<(&Classifier, &Classifier, &fl_model::data::LabelledTexts, &Path)>,
) -> Result<()> {
    let mut rows = rows.to_vec();
    if let Some((original, exported, data, path)) = accuracy {
        let before = evaluate_rows(original, data)?.accuracy;
        let after = evaluate_rows(exported, data)?.accuracy;
        let note = format!("({:+.2} points on {}, {} rows)", 100.0 * (after - before), path.display(), data.len());
        rows.push(("accuracy", format!("{before:.4}"), format!("{after:.4}"), note));
    }
    println!("{:<12} {:>width$} {:>width$}", "", "before", "after");
    for (row, before, after, note) in rows {
        println!("{}", format!("{row:<12} {before:>width$} {after:>width$}  {note}").trim_end());
    }
    Ok(())
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().enable_all().build()?)
}

fn real_main(cli: Cli) -> Result<ExitCode> {
    // `train` and `distill` keep SIGPIPE ignored and print with `print_line`: a closed stdout must
    // not stop them before the model is written.
    fl_model::pretrained::configure(&cli.pretrained)?;
    if matches!(
        cli.command,
        Command::Predict { .. }
            | Command::GenData { .. }
            | Command::Export { .. }
            | Command::Rules { .. }
            | Command::Embed { .. }
            | Command::Report { .. }
    ) {
        fl_common::cli::die_quietly_on_closed_stdout();
    }
    match cli.command {
        Command::Enroll { coordinator, token, state_dir, name, force } => {
            let state = ClientState::new(&state_dir);
            let name = name.unwrap_or_else(default_name);
            let identity =
                runtime()?.block_on(fl_client::enroll::enroll(&coordinator, &token, &name, &state, force))?;
            println!(
                "enrolled as {} ({}); identity stored in {}",
                identity.record.client_id,
                name,
                state_dir.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Run {
            coordinator,
            state_dir,
            data,
            name,
            threads,
            max_backoff,
            personalize,
            ditto_lambda,
            ditto_min_steps,
            local_test_fraction,
            finetune_epochs,
            local_prior,
            attack,
            compression,
        } => {
            // Held until the process ends: a second `run` on this state dir is refused at once.
            let _lock = fl_common::files::DirLock::acquire(&state_dir, "fl-client run")?;
            if let Some(attack) = attack {
                tracing::warn!(%attack, "--attack: this client sends POISONED updates; a test tool for robust aggregation");
                eprintln!("WARNING: --attack {attack}: this client sends poisoned updates (a test tool, not for real federations)");
            }
            // Check the whole file before connecting: nothing trains on half a file.
            let mut rows = read_labelled_csv(&data)?;
            // Bad flags or too little data: retrying cannot help (exit 2).
            let refuse = |ok: bool, why: String| if ok { Ok(()) } else { Err(fl_common::cli::Permanent::error(why)) };
            refuse(ditto_lambda >= 0.0 && ditto_lambda.is_finite(), "--ditto-lambda must be 0 or more".into())?;
            let personal = match personalize {
                None => {
                    refuse(finetune_epochs.is_none(), "--finetune-epochs needs --personalize finetune".into())?;
                    refuse(local_prior.is_none(), "--local-prior needs --personalize finetune".into())?;
                    None
                }
                Some(how) => {
                    refuse(
                        local_test_fraction > 0.0 && local_test_fraction < 1.0,
                        "--local-test-fraction must be between 0 and 1 (exclusive)".into(),
                    )?;
                    let (train, test) = split_validation(&rows, local_test_fraction, 7);
                    refuse(
                        !train.is_empty() && !test.is_empty(),
                        format!(
                            "{}: {} rows are too few to hold out {local_test_fraction} of them for --personalize",
                            data.display(),
                            rows.len()
                        ),
                    )?;
                    rows = train;
                    let method = match how {
                        PersonalizeArg::Finetune => Personalization::Finetune,
                        PersonalizeArg::Fedper => Personalization::Fedper,
                        PersonalizeArg::Ditto => {
                            Personalization::Ditto { lambda: ditto_lambda, min_steps: ditto_min_steps }
                        }
                    };
                    refuse(
                        finetune_epochs.is_none() || method == Personalization::Finetune,
                        format!("--finetune-epochs applies to --personalize finetune only (not {method})"),
                    )?;
                    refuse(
                        local_prior.is_none() || method == Personalization::Finetune,
                        format!("--local-prior applies to --personalize finetune only (not {method})"),
                    )?;
                    tracing::info!(%method, train_rows = rows.len(), test_rows = test.len(), "personalising");
                    let dir = state_dir.join("personal");
                    let final_epochs = finetune_epochs.unwrap_or(1);
                    Some(PersonalConfig {
                        method,
                        test: Arc::new(test),
                        dir,
                        final_epochs,
                        local_prior: local_prior.unwrap_or(true),
                    })
                }
            };
            let identity = ClientState::new(&state_dir).load()?;
            let threads =
                threads.unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get() as i32).unwrap_or(1));
            tch::set_num_threads(threads);
            tch::set_num_interop_threads(1);
            // The codec's passes over the model (top-k, the digest) run on rayon's pool.
            if let Err(e) = rayon::ThreadPoolBuilder::new().num_threads(threads as usize).build_global() {
                tracing::warn!("the encoding thread pool keeps its own size: {e}");
            }
            tracing::info!(rows = rows.len(), file = %data.display(), threads, device = ?default_device(), "local data checked");
            let config = DaemonConfig {
                coordinator,
                name: name.unwrap_or_else(|| identity.record.name.clone()),
                identity,
                data: Arc::new(rows),
                max_backoff: Duration::from_secs_f64(max_backoff),
                threads,
                personal,
                state_dir: state_dir.clone(),
                attack,
                compression,
            };
            let shutdown = CancellationToken::new();
            let rt = runtime()?;
            rt.spawn(fl_common::cli::cancel_on_signal(shutdown.clone()));
            match rt.block_on(daemon::run(config, shutdown))? {
                DaemonExit::FederationFinished => Ok(ExitCode::SUCCESS),
                DaemonExit::Shutdown => Ok(ExitCode::from(130)),
            }
        }
        Command::Predict {
            model,
            personal,
            state_dir,
            text,
            data,
            explain: explaining,
            method,
            steps,
            top,
            attention,
        } => {
            let model = match (model, state_dir) {
                (Some(model), _) => model,
                (None, Some(dir)) if personal => {
                    let path = PersonalConfig::model_path(&dir);
                    anyhow::ensure!(
                        path.exists(),
                        "this client has no personal model ({} does not exist): run `fl-client run --personalize finetune|fedper|ditto` first, or predict with --model",
                        path.display()
                    );
                    path
                }
                _ => anyhow::bail!("pass --model, or --personal with --state-dir"),
            };
            // Explanations differentiate through the model in evaluation mode, which cuDNN's LSTM
            // cannot do; single texts are cheap on the CPU.
            let device = if explaining || attention { tch::Device::Cpu } else { default_device() };
            let classifier = Classifier::load(&model, device)?;
            anyhow::ensure!(
                !attention || classifier.spec.kind == ModelKind::Transformer,
                "--attention needs a transformer model; {} is a {}",
                model.display(),
                classifier.spec.kind
            );
            // A text with no word gives the model nothing to read: its label would be the bias alone.
            if let Some(t) = text.iter().find(|t| fl_model::tokenizer::words(t).is_empty()) {
                return Err(fl_common::cli::Permanent::error(format!(
                    "--text {t:?} has no word the model can read (letters or digits); nothing to classify"
                )));
            }
            let method = match method {
                MethodArg::Ig => Method::IntegratedGradients { steps },
                MethodArg::Occlusion => Method::Occlusion,
            };
            let describe = |text: &str| {
                if explaining {
                    print!("{}", describe_explanation(&classifier, &explain(&classifier, text, method), top));
                } else {
                    print!("{}", describe_prediction(&classifier, text));
                }
                if attention {
                    print!("{}", describe_attention(&classifier, text).unwrap_or_default());
                }
            };
            if let Some(path) = data {
                let rows = read_labelled_csv(&path)?;
                if explaining || attention {
                    for (text, label) in rows.texts.iter().zip(&rows.labels) {
                        println!(
                            "text: {text}
true label: {label}"
                        );
                        describe(text);
                        println!();
                    }
                }
                let started = std::time::Instant::now();
                let evaluation = evaluate_rows(&classifier, &rows)?;
                let seconds = started.elapsed().as_secs_f64();
                print!("{evaluation}");
                println!(
                    "predicted {} rows in {seconds:.2} s: {:.0} examples/s ({})",
                    rows.len(),
                    rows.len() as f64 / seconds.max(1e-9),
                    if classifier.runs_int8() { "int8" } else { "f32" }
                );
            } else {
                for (i, t) in text.iter().enumerate() {
                    if text.len() > 1 || explaining || attention {
                        println!("{}text: {t}", if i > 0 { "\n" } else { "" });
                    }
                    describe(t);
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Train {
            data,
            model,
            out,
            epochs,
            lr,
            batch_size,
            optimizer,
            validation,
            keep_last,
            labels,
            threads,
            seed,
            arch,
        } => {
            anyhow::ensure!((0.0..1.0).contains(&validation), "--validation must be in [0, 1)");
            let rows = read_labelled_csv(&data)?;
            let labels = labels.unwrap_or_else(|| rows.distinct_labels());
            let spec = arch.spec(model, labels).map_err(anyhow::Error::msg)?;
            let mut train = default_train_config(model);
            train.epochs = epochs.unwrap_or(train.epochs);
            train.lr = lr.unwrap_or(train.lr);
            train.batch_size = batch_size.unwrap_or(train.batch_size);
            train.optimizer = optimizer;
            train.seed = seed;
            let threads =
                threads.unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get() as i32).unwrap_or(1));
            tch::set_num_threads(threads);
            tch::set_num_interop_threads(1);
            let device = default_device();
            let config = CentralConfig { spec, train, validation, keep_best: !keep_last };
            let cancel = CancellationToken::new();
            let rt = runtime()?;
            rt.spawn(fl_common::cli::cancel_on_signal(cancel.clone()));
            let started = std::time::Instant::now();
            let mut reporter = TrainingProgress::new(&config, threads, device);
            let outcome = train_central(&rows, &config, device, &cancel, |p| reporter.report(p))?;
            reporter.finish();
            if outcome.cancelled {
                fl_common::cli::eprint_line("interrupted; no model written");
                return Ok(ExitCode::from(130));
            }
            outcome.model.save(&out)?;
            let kept = outcome.epochs.iter().find(|r| r.epoch == outcome.kept_epoch);
            // The median epoch: one epoch slowed down by other work on the machine does not move it.
            let mut speeds: Vec<f64> = outcome.epochs.iter().map(|r| r.examples_per_s).collect();
            speeds.sort_by(f64::total_cmp);
            let median_speed = speeds.get(speeds.len() / 2).copied().unwrap_or(0.0);
            fl_common::cli::print_line(&format!(
                "wrote {} ({} model, {} parameters, weights of epoch {}{}) in {:.1} s; median epoch: {:.0} examples/s",
                out.display(),
                config.spec.kind,
                outcome.model.num_parameters(),
                outcome.kept_epoch,
                kept.and_then(|r| r.validation_accuracy)
                    .map(|a| format!(", validation accuracy {a:.4}"))
                    .unwrap_or_default(),
                started.elapsed().as_secs_f64(),
                median_speed,
            ));
            Ok(ExitCode::SUCCESS)
        }
        Command::Distill {
            teacher,
            student_model,
            data,
            unlabeled,
            temperature,
            alpha,
            out,
            epochs,
            lr,
            validation,
            threads,
            seed,
            arch,
        } => {
            anyhow::ensure!((0.0..1.0).contains(&validation), "--validation must be in [0, 1)");
            anyhow::ensure!(temperature > 0.0 && temperature.is_finite(), "--temperature must be > 0");
            anyhow::ensure!((0.0..=1.0).contains(&alpha), "--alpha must be in [0, 1]");
            let threads =
                threads.unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get() as i32).unwrap_or(1));
            tch::set_num_threads(threads);
            tch::set_num_interop_threads(1);
            let device = default_device();
            let teacher_model = Classifier::load(&teacher, device)?;
            let rows = read_labelled_csv(&data)?;
            let unlabelled = unlabeled.as_deref().map(read_unlabelled_csv).transpose()?.unwrap_or_default();
            let spec = arch.spec(student_model, teacher_model.spec.labels.clone()).map_err(anyhow::Error::msg)?;
            let mut train = default_train_config(student_model);
            train.epochs = epochs.unwrap_or(train.epochs);
            train.lr = lr.unwrap_or(train.lr);
            train.seed = seed;
            let config = CentralConfig { spec, train, validation, keep_best: true };
            let cancel = CancellationToken::new();
            let rt = runtime()?;
            rt.spawn(fl_common::cli::cancel_on_signal(cancel.clone()));
            let started = std::time::Instant::now();
            let mut reporter = TrainingProgress::new(&config, threads, device);
            let teacher_ref = Teacher {
                model: &teacher_model,
                distillation: Distillation { temperature, alpha },
                unlabelled: &unlabelled,
            };
            let outcome = train_student(&rows, &config, Some(&teacher_ref), device, &cancel, |p| reporter.report(p))
                .with_context(|| format!("distilling {}", teacher.display()))?;
            reporter.finish();
            if outcome.cancelled {
                fl_common::cli::eprint_line("interrupted; no model written");
                return Ok(ExitCode::from(130));
            }
            outcome.model.save(&out)?;
            let (_, held_out) = split_validation(&rows, validation, seed);
            let size = |p: &std::path::Path| std::fs::metadata(p).map(|m| m.len() as f64 / 1e6).unwrap_or(0.0);
            fl_common::cli::print_line(&format!(
                "{:<8} {:<12} {:>12} {:>10} {:>22}",
                "", "model", "parameters", "size", "held-out accuracy"
            ));
            for (who, model, path) in [("teacher", &teacher_model, &teacher), ("student", &outcome.model, &out)] {
                let accuracy = if held_out.is_empty() {
                    "-".to_string()
                } else {
                    format!("{:.4}", evaluate_rows(model, &held_out)?.accuracy)
                };
                fl_common::cli::print_line(&format!(
                    "{who:<8} {:<12} {:>12} {:>7.2} MB {:>22}",
                    model.spec.kind.to_string(),
                    model.num_parameters(),
                    size(path),
                    accuracy
                ));
            }
            fl_common::cli::print_line(&format!(
                "wrote {} (weights of epoch {}, {} held-out rows) in {:.1} s",
                out.display(),
                outcome.kept_epoch,
                held_out.len(),
                started.elapsed().as_secs_f64()
            ));
            Ok(ExitCode::SUCCESS)
        }
        Command::Export { model, out, data, merge: true, .. } => export_merged(&model, &out, data.as_deref()),
        Command::Export {
            model,
            out,
            quantize,
            prune,
            prune_scope,
            prune_rows,
            untouched_from,
            data,
            merge: false,
        } => {
            anyhow::ensure!((0.0..1.0).contains(&prune), "--prune must be in [0, 1), got {prune}");
            anyhow::ensure!(!prune_rows || prune > 0.0, "--prune-rows needs --prune FRACTION (of rows to drop)");
            let options = ExportOptions {
                precision: match quantize {
                    QuantizeArg::Int8 => Precision::Int8,
                    QuantizeArg::F16 => Precision::F16,
                    QuantizeArg::None => Precision::F32,
                },
                prune,
                scope: match prune_scope {
                    ScopeArg::Tensor => PruneScope::Tensor,
                    ScopeArg::Global => PruneScope::Global,
                },
                prune_rows,
            };
            let rows_data = data.as_ref().map(|p| read_labelled_csv(p)).transpose()?;
            let before_size = std::fs::metadata(&model).with_context(|| format!("reading {}", model.display()))?.len();
            let original = Classifier::load(&model, tch::Device::Cpu)?;
            let mut weights = original.to_tensors();
            let untouched = match &untouched_from {
                Some(initial) => Some(
                    drop_untouched_rows(&mut weights, &original.spec, initial)
                        .map_err(|e| fl_common::cli::Permanent::error(format!("--untouched-from {e}")))?,
                ),
                None => None,
            };
            let exported =
                export(&original.spec, &weights, &options).with_context(|| format!("exporting {}", model.display()))?;
            fl_common::files::write_atomic(&out, &exported.bytes, 0o644)
                .with_context(|| format!("writing {}", out.display()))?;
            let shrunk = Classifier::load(&out, tch::Device::Cpu)?;
            let mut what = options.precision.to_string();
            if prune > 0.0 {
                let scope = match (prune_rows, prune_scope) {
                    (true, _) => "of embedding rows",
                    (false, ScopeArg::Tensor) => "of each weight matrix",
                    (false, ScopeArg::Global) => "of all weights",
                };
                what += &format!(", {:.0}% {scope} pruned", prune * 100.0);
            }
            if let Some(n) = untouched {
                println!("{n} embedding rows never touched (equal to the initial model's) dropped");
            }
            let rows = [
                ("format", "f32".to_string(), what, String::new()),
                (
                    "file size",
                    megabytes(before_size),
                    megabytes(exported.bytes.len() as u64),
                    format!("({:.3} of the size)", exported.bytes.len() as f64 / before_size.max(1) as f64),
                ),
                (
                    "parameters",
                    exported.parameters.to_string(),
                    exported.nonzero.to_string(),
                    format!("({:.1}% non-zero)", 100.0 * exported.nonzero as f64 / exported.parameters.max(1) as f64),
                ),
            ];
            let accuracy = rows_data.as_ref().zip(data.as_deref()).map(|(rows, path)| (&original, &shrunk, rows, path));
            print_export_table(14, &rows, accuracy)?;
            println!("wrote {}{}", out.display(), if shrunk.runs_int8() { " (predict runs it in int8)" } else { "" });
            Ok(ExitCode::SUCCESS)
        }
        Command::Rules { model, data, test, holdout, per_class, min_precision, min_support, format, seed } => {
            anyhow::ensure!((0.0..1.0).contains(&holdout), "--holdout must be in [0, 1)");
            anyhow::ensure!((0.0..=1.0).contains(&min_precision), "--min-precision must be in [0, 1]");
            anyhow::ensure!(per_class >= 1, "--per-class must be at least 1");
            let classifier = Classifier::load(&model, tch::Device::Cpu)?;
            let rows = read_labelled_csv(&data)?;
            rows.label_indices(&classifier.spec.labels)?;
            let (build, heldout) = match &test {
                Some(path) => (rows, read_labelled_csv(path)?),
                None => {
                    let (build, heldout) = split_validation(&rows, holdout, seed);
                    anyhow::ensure!(
                        !heldout.is_empty(),
                        "{}: too few rows to hold out {holdout} of them; pass --test or a larger --holdout",
                        data.display()
                    );
                    (build, heldout)
                }
            };
            let truth: Vec<usize> =
                heldout.label_indices(&classifier.spec.labels)?.into_iter().map(|l| l as usize).collect();
            let config = RulesConfig { per_class, min_precision, min_support, ..Default::default() };
            let report =
                extract_rules(&classifier, &texts(&build.texts), &texts(&heldout.texts), &truth, &config, |step| {
                    eprintln!("{step}...")
                });
            match format {
                FormatArg::Text => print!("{}", report.to_text()),
                FormatArg::Json => println!("{}", serde_json::to_string_pretty(&report)?),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Embed { model, data, out } => {
            let classifier = Classifier::load(&model, tch::Device::Cpu)?;
            let rows = read_labelled_csv(&data)?;
            let truth: Vec<usize> =
                rows.label_indices(&classifier.spec.labels)?.into_iter().map(|l| l as usize).collect();
            let texts: Vec<&str> = rows.texts.iter().map(String::as_str).collect();
            eprintln!("embedding {} rows...", texts.len());
            let embedding = embed(&classifier, &texts, Some(&truth));
            write_points_csv(&out, &embedding, &texts, &classifier.spec.labels)
                .with_context(|| format!("writing {}", out.display()))?;
            println!(
                "wrote {} points to {} (the two axes hold {:.1} % and {:.1} % of the variance)",
                texts.len(),
                out.display(),
                100.0 * embedding.explained[0],
                100.0 * embedding.explained[1]
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Report { model, data, out, per_class, max_points } => {
            anyhow::ensure!(per_class >= 1, "--per-class must be at least 1");
            let classifier = Classifier::load(&model, tch::Device::Cpu)?;
            let rows = read_labelled_csv(&data)?;
            let truth: Vec<usize> =
                rows.label_indices(&classifier.spec.labels)?.into_iter().map(|l| l as usize).collect();
            eprintln!("evaluating {} rows...", rows.len());
            let evaluation = evaluate_rows(&classifier, &rows)?;
            let (build, heldout) = split_validation(&rows, 0.3, 42);
            let held_truth: Vec<usize> =
                heldout.label_indices(&classifier.spec.labels)?.into_iter().map(|l| l as usize).collect();
            let config = RulesConfig { per_class, ..Default::default() };
            let rules = extract_rules(
                &classifier,
                &texts(&build.texts),
                &texts(&heldout.texts),
                &held_truth,
                &config,
                |step| eprintln!("rules: {step}..."),
            );
            let step = rows.len().div_ceil(max_points.max(1));
            let sample: Vec<usize> = (0..rows.len()).step_by(step).collect();
            let sample_texts: Vec<&str> = sample.iter().map(|&i| rows.texts[i].as_str()).collect();
            let sample_truth: Vec<usize> = sample.iter().map(|&i| truth[i]).collect();
            eprintln!("embedding {} rows...", sample.len());
            let embedding = embed(&classifier, &sample_texts, Some(&sample_truth));
            let title = format!("{} on {}", model.display(), data.display());
            let page = render_report(&title, &evaluation, &rules, &embedding);
            std::fs::write(&out, page).with_context(|| format!("writing {}", out.display()))?;
            println!(
                "wrote {}: accuracy {:.4}, {} rules with fidelity {:.4} on held-out rows, {} points",
                out.display(),
                evaluation.accuracy,
                rules.rule_list.rules.len(),
                rules.heldout_fidelity,
                sample.len()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::GenData {
            out,
            rows,
            eval_rows,
            test_rows,
            classes,
            shards,
            partition: how,
            alpha,
            classes_per_client,
            signal,
            seed,
        } => {
            let how = match how {
                PartitionArg::Iid => Partition::Iid,
                PartitionArg::Dirichlet => Partition::Dirichlet(alpha),
                PartitionArg::Pathological => Partition::Pathological(classes_per_client),
            };
            anyhow::ensure!((2..=16).contains(&classes), "--classes must be 2 to 16");
            anyhow::ensure!(shards >= 1, "--shards must be at least 1");
            let generator = TextGenerator::new(GeneratorConfig { classes, signal, seed, ..Default::default() });
            let labels = generator.labels();
            std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
            let train = generator.rows(rows, seed.wrapping_add(1));
            let write = |name: &str, rows: &[fl_model::datagen::Row]| {
                let path = out.join(name);
                write_csv(&path, rows, &labels).with_context(|| format!("writing {}", path.display()))
            };
            write("train.csv", &train)?;
            write("eval.csv", &generator.rows(eval_rows, seed.wrapping_add(2)))?;
            write("test.csv", &generator.rows(test_rows, seed.wrapping_add(3)))?;
            let parts = partition(&train, shards, how, classes, seed).map_err(fl_common::cli::Permanent::error)?;
            for (i, shard) in parts.iter().enumerate() {
                write(&format!("shard-{}.csv", i + 1), shard)?;
            }
            println!(
                "wrote {} train rows in {shards} shards, {eval_rows} eval and {test_rows} test rows to {}",
                rows,
                out.display()
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The progress bar and epoch lines of `train` and `distill`.
struct TrainingProgress {
    bar: ProgressBar,
    rows_per_epoch: u64,
    header: String,
    epochs: u32,
}

impl TrainingProgress {
    fn new(config: &CentralConfig, threads: i32, device: tch::Device) -> TrainingProgress {
        let header = format!(
            "{} epochs, lr {}, batch {}, {threads} threads, {device:?}",
            config.train.epochs, config.train.lr, config.train.batch_size
        );
        TrainingProgress {
            bar: ProgressBar::hidden(),
            rows_per_epoch: 0,
            header: format!("training {} on {{train}} rows ({{held}} held out), {header}", config.spec.kind),
            epochs: config.train.epochs,
        }
    }

    fn report(&mut self, p: Progress<'_>) {
        match p {
            Progress::Start { train_rows, validation_rows } => {
                fl_common::cli::eprint_line(
                    &self
                        .header
                        .replace("{train}", &train_rows.to_string())
                        .replace("{held}", &validation_rows.to_string()),
                );
                self.rows_per_epoch = train_rows as u64;
                self.bar = ProgressBar::new(self.rows_per_epoch * u64::from(self.epochs));
                self.bar.set_style(
                    ProgressStyle::with_template(
                        "{elapsed_precise} [{bar:30}] {pos}/{len} examples, epoch {prefix}, {msg} (eta {eta})",
                    )
                    .expect("valid template")
                    .progress_chars("=> "),
                );
            }
            Progress::Step { epoch, stats, examples_per_s } => {
                self.bar.set_prefix(epoch.to_string());
                self.bar.set_position(u64::from(epoch - 1) * self.rows_per_epoch + stats.examples as u64);
                self.bar.set_message(format!("loss {:.4}, {examples_per_s:.0} examples/s", stats.loss));
            }
            Progress::Epoch(r) => {
                let validation = match (r.validation_accuracy, r.validation_loss) {
                    (Some(a), Some(l)) => format!(", validation accuracy {a:.4} loss {l:.4}"),
                    _ => String::new(),
                };
                // Printed even when stderr is not a terminal and the bar stays hidden.
                self.bar.suspend(|| {
                    fl_common::cli::print_line(&format!(
                        "epoch {}: train loss {:.4} accuracy {:.4}{validation}, {:.0} examples/s",
                        r.epoch, r.train_loss, r.train_accuracy, r.examples_per_s
                    ))
                });
            }
        }
    }

    fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

/// The texts as string slices.
fn texts(rows: &[String]) -> Vec<&str> {
    rows.iter().map(String::as_str).collect()
}

fn default_name() -> String {
    std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty()).unwrap_or_else(|| "client".into())
}
