//! Labelled CSV files (`text,label` with a header), read whole and checked before any training.

use std::path::{Path, PathBuf};

/// Why a CSV file was refused. Every variant names the file; row errors name the line where the
/// bad record starts and the field.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// The file could not be opened or read.
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    /// The file has no header line.
    #[error("{path}: empty file: expected a header line 'text,label'")]
    Empty { path: PathBuf },
    /// The header lacks a required column.
    #[error("{path}: line 1: missing column '{column}' in header (found: {found})")]
    MissingColumn { path: PathBuf, column: &'static str, found: String },
    /// A record is malformed or has a bad value.
    #[error("{path}: line {line}, field '{field}': {message}")]
    Record { path: PathBuf, line: u64, field: String, message: String },
    /// The file is binary (a gzip, a model file...), not CSV text.
    #[error("{path}: not a text file (it holds binary bytes; decompress or export it as UTF-8 CSV first)")]
    NotText { path: PathBuf },
    /// The header is there but no record follows.
    #[error("{path}: no data rows after the header")]
    NoRows { path: PathBuf },
}

/// The rows of a labelled CSV file.
#[derive(Clone, Debug, Default)]
pub struct LabelledTexts {
    /// Texts, one per row.
    pub texts: Vec<String>,
    /// Label strings, one per row.
    pub labels: Vec<String>,
    /// The line on which each row starts (for errors found later, e.g. an unknown label).
    pub lines: Vec<u64>,
    /// The file the rows came from.
    pub path: PathBuf,
}

impl LabelledTexts {
    /// Number of rows.
    pub fn len(&self) -> usize {
        self.texts.len()
    }

    /// True when there are no rows.
    pub fn is_empty(&self) -> bool {
        self.texts.is_empty()
    }

    /// Label indices in `labels`; an unknown label is an error naming its line.
    pub fn label_indices(&self, labels: &[String]) -> Result<Vec<i64>, DataError> {
        self.labels
            .iter()
            .zip(&self.lines)
            .map(|(label, &line)| {
                labels.iter().position(|l| l == label).map(|i| i as i64).ok_or_else(|| DataError::Record {
                    path: self.path.clone(),
                    line,
                    field: "label".into(),
                    message: format!("unknown label '{label}' (this federation's labels: {})", labels.join(",")),
                })
            })
            .collect()
    }

    /// The distinct labels, sorted.
    pub fn distinct_labels(&self) -> Vec<String> {
        let mut labels = self.labels.clone();
        labels.sort();
        labels.dedup();
        labels
    }
}

/// Reads and checks a whole labelled CSV file: a header with `text` and `label` columns (any
/// order, other columns ignored), UTF-8, every record complete, no empty label.
pub fn read_labelled_csv(path: &Path) -> Result<LabelledTexts, DataError> {
    let file = std::fs::File::open(path).map_err(|source| DataError::Io { path: path.to_owned(), source })?;
    read_labelled_csv_from(path, file)
}

/// Reads the texts of a CSV file with a `text` column (a `label` column, if any, is ignored),
/// checked as [`read_labelled_csv`] checks: texts for a teacher to label.
pub fn read_unlabelled_csv(path: &Path) -> Result<Vec<String>, DataError> {
    let file = std::fs::File::open(path).map_err(|source| DataError::Io { path: path.to_owned(), source })?;
    Ok(read_csv_from(path, file, false)?.texts)
}

/// As [`read_labelled_csv`], from any reader; `path` is used in messages.
pub fn read_labelled_csv_from(path: &Path, reader: impl std::io::Read) -> Result<LabelledTexts, DataError> {
    read_csv_from(path, reader, true)
}

fn read_csv_from(path: &Path, reader: impl std::io::Read, labelled: bool) -> Result<LabelledTexts, DataError> {
    let record_error = |line: u64, field: &str, message: String| DataError::Record {
        path: path.to_owned(),
        line,
        field: field.to_owned(),
        message,
    };
    let mut csv = csv::ReaderBuilder::new().has_headers(false).flexible(true).from_reader(reader);
    let mut record = csv::ByteRecord::new();
    let read = |csv: &mut csv::Reader<_>, record: &mut csv::ByteRecord| -> Result<bool, DataError> {
        csv.read_byte_record(record).map_err(|e| {
            let line = e.position().map(|p| p.line()).unwrap_or(0);
            match e.into_kind() {
                csv::ErrorKind::Io(source) => DataError::Io { path: path.to_owned(), source },
                other => record_error(line, "record", format!("{other:?}")),
            }
        })
    };
    if !read(&mut csv, &mut record)? {
        return Err(DataError::Empty { path: path.to_owned() });
    }
    // A NUL byte or invalid UTF-8 in the header line: binary data, reported without its bytes.
    if record.iter().any(|f| f.contains(&0) || std::str::from_utf8(f).is_err()) {
        return Err(DataError::NotText { path: path.to_owned() });
    }
    let header: Vec<String> =
        record.iter().map(|f| String::from_utf8_lossy(f).trim().trim_start_matches('\u{feff}').to_owned()).collect();
    let column = |name: &'static str| {
        header.iter().position(|h| h == name).ok_or_else(|| DataError::MissingColumn {
            path: path.to_owned(),
            column: name,
            found: header.join(","),
        })
    };
    let text_col = column("text")?;
    let label_col = if labelled { Some(column("label")?) } else { None };
    let mut rows = LabelledTexts { path: path.to_owned(), ..Default::default() };
    while read(&mut csv, &mut record)? {
        let line = record.position().map(|p| p.line()).unwrap_or(0);
        if record.len() != header.len() {
            return Err(record_error(
                line,
                "record",
                format!("has {} fields, the header has {}", record.len(), header.len()),
            ));
        }
        let field = |col: usize, name: &str| {
            std::str::from_utf8(&record[col])
                .map(str::to_owned)
                .map_err(|e| record_error(line, name, format!("not valid UTF-8 (byte {})", e.valid_up_to())))
        };
        let text = field(text_col, "text")?;
        let label = match label_col {
            Some(col) => field(col, "label")?.trim().to_owned(),
            None => String::new(),
        };
        if labelled && label.is_empty() {
            return Err(record_error(line, "label", "empty label".into()));
        }
        rows.texts.push(text);
        rows.labels.push(label);
        rows.lines.push(line);
    }
    if rows.is_empty() {
        return Err(DataError::NoRows { path: path.to_owned() });
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &[u8]) -> Result<LabelledTexts, DataError> {
        read_labelled_csv_from(Path::new("data.csv"), s)
    }

    #[test]
    fn reads_quotes_commas_and_newlines_inside_fields() {
        let rows = parse(b"label,text\npos,\"good, really\nvery good\"\nneg,\"said \"\"no\"\"\"\n").unwrap();
        assert_eq!(rows.texts, vec!["good, really\nvery good", "said \"no\""]);
        assert_eq!(rows.labels, vec!["pos", "neg"]);
        assert_eq!(rows.lines, vec![2, 4]);
    }

    #[test]
    fn errors_name_file_line_and_field() {
        let msg = |s: &[u8]| parse(s).unwrap_err().to_string();
        assert_eq!(msg(b""), "data.csv: empty file: expected a header line 'text,label'");
        assert!(msg(b"text,lbl\na,b\n").contains("line 1: missing column 'label'"));
        assert_eq!(msg(b"text,label\n"), "data.csv: no data rows after the header");
        assert_eq!(
            msg(b"text,label\nok,pos\nmissing\n"),
            "data.csv: line 3, field 'record': has 1 fields, the header has 2"
        );
        assert_eq!(msg(b"text,label\nok,pos\n\"x\",\n"), "data.csv: line 3, field 'label': empty label");
        assert_eq!(
            msg(b"text,label\nok,pos\nbad \xff,pos\n"),
            "data.csv: line 3, field 'text': not valid UTF-8 (byte 4)"
        );
        let gzip = msg(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03\xcb\x48,x\n");
        assert!(gzip.starts_with("data.csv: not a text file"), "{gzip}");
        assert!(!gzip.contains('\u{fffd}'), "no bytes of the file in the message: {gzip}");
        let texts = read_csv_from(Path::new("u.csv"), b"id,text\n1,a b\n2,c\n".as_slice(), false).unwrap().texts;
        assert_eq!(texts, vec!["a b", "c"]);
        let rows = parse(b"text,label\na,pos\nb,what\n").unwrap();
        let err = rows.label_indices(&["pos".into(), "neg".into()]).unwrap_err().to_string();
        assert_eq!(err, "data.csv: line 3, field 'label': unknown label 'what' (this federation's labels: pos,neg)");
    }

    proptest::proptest! {
        #[test]
        fn loader_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300)) {
            let _ = parse(&bytes);
        }
    }
}
