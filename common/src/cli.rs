//! What both binaries set up the same way at the start of `main`: the TLS crypto provider,
//! logging, SIGPIPE, and the shutdown signal.

use tokio_util::sync::CancellationToken;

/// Installs the crypto provider and logs to stderr filtered by `RUST_LOG` (default `info`).
pub fn init() {
    crate::tls::install_crypto_provider();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// Restores SIGPIPE's default, so that a command whose output goes to a pipe that closes
/// (`fl-client predict ... | head -1`) ends quietly, as `cat` does, instead of panicking in
/// `println!`. Only for commands that write results to stdout and hold no network connection: a
/// server must see EPIPE as an error on one socket, not die of the signal.
pub fn die_quietly_on_closed_stdout() {
    // SAFETY: sets a signal disposition to its default; called at the start of main.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// Raises this process's soft limit of open files to its hard limit, and returns the limit now
/// in force. Each connected client holds a socket: a coordinator of 1,000 clients needs more than
/// the soft limit of 1,024 that shells and systemd services often start with, while the hard
/// limit is usually far higher (Go's runtime raises it the same way). Returns `None` where the
/// limit cannot be read.
#[allow(clippy::unnecessary_cast)] // `rlim_t` is u64 on Linux, not on every target.
pub fn raise_open_files_limit() -> Option<u64> {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed to them.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return None;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit { rlim_cur: limit.rlim_max, rlim_max: limit.rlim_max };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit.rlim_cur = limit.rlim_max;
            }
        }
    }
    Some(limit.rlim_cur as u64)
}

/// Cancels `token` on the first SIGINT or SIGTERM.
pub async fn cancel_on_signal(token: CancellationToken) {
    let term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate());
    match term {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(e) => {
            tracing::warn!("no SIGTERM handler ({e}); only SIGINT stops this process");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
    token.cancel();
}

/// The exit statuses of both binaries: what a supervisor can rely on (README, "Exit codes").
pub mod exit {
    /// Done.
    pub const DONE: u8 = 0;
    /// Transient: worth a restart (network, coordinator away, disk full).
    pub const TRANSIENT: u8 = 1;
    /// Permanent: bad input or flags, refused identity or token, changed federation flags,
    /// locked state dir. Restarting cannot help (systemd `RestartPreventExitStatus=2`).
    pub const PERMANENT: u8 = 2;
    /// Interrupted by SIGINT or SIGTERM; state is saved.
    pub const INTERRUPTED: u8 = 130;
}

/// An error that retrying cannot fix: bad input, a refused token, a malformed URL. Wrap the
/// cause with [`Permanent::error`]; [`exit_status`] maps it to [`exit::PERMANENT`].
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Permanent(pub String);

impl Permanent {
    /// A permanent error with this message.
    pub fn error(message: impl std::fmt::Display) -> anyhow::Error {
        anyhow::Error::new(Permanent(message.to_string()))
    }
}

/// The exit status for `e`: [`exit::PERMANENT`] when any cause is a [`Permanent`], a locked
/// state dir, a malformed URL, an input file that is missing, unreadable or malformed, or when
/// `permanent` (the binary's own list of errors) says so; [`exit::TRANSIENT`] otherwise.
pub fn exit_status(e: &anyhow::Error, permanent: impl Fn(&(dyn std::error::Error + 'static)) -> bool) -> u8 {
    use std::io::ErrorKind;
    let is_permanent = |c: &(dyn std::error::Error + 'static)| {
        if c.is::<Permanent>() || c.is::<crate::files::LockError>() || permanent(c) {
            return true;
        }
        if let Some(crate::tls::ConnectError::Url { .. }) = c.downcast_ref::<crate::tls::ConnectError>() {
            return true;
        }
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                ErrorKind::NotFound
                    | ErrorKind::PermissionDenied
                    | ErrorKind::InvalidData
                    | ErrorKind::InvalidInput
                    | ErrorKind::AlreadyExists
                    | ErrorKind::IsADirectory
                    | ErrorKind::NotADirectory
                    | ErrorKind::ReadOnlyFilesystem
            );
        }
        false
    };
    if e.chain().any(is_permanent) {
        exit::PERMANENT
    } else {
        exit::TRANSIENT
    }
}

/// `e` with each cause once: `context: cause: cause`, skipping a cause whose text the line already
/// holds (an io error that its wrapper prints, then returns as its source, appeared twice).
pub fn describe(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if text.is_empty() || out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

/// Prints `error: ...` (each cause once) to stderr, never panicking on a closed stderr, and
/// returns the exit status [`exit_status`] gives.
pub fn report_error(
    e: &anyhow::Error,
    permanent: impl Fn(&(dyn std::error::Error + 'static)) -> bool,
) -> std::process::ExitCode {
    eprint_line(&format!("error: {}", describe(e)));
    std::process::ExitCode::from(exit_status(e, permanent))
}

/// Writes a line to stdout; a closed stdout is ignored (a daemon or `train` must not die of it).
pub fn print_line(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stdout(), "{line}");
}

/// Writes a line to stderr; a closed stderr is ignored.
pub fn eprint_line(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// A string from a client (a name, a reason) fit for a log line or a table: control characters
/// escaped (a newline cannot forge a log line, an escape sequence cannot reach the terminal) and at
/// most `max` characters, with `…` when cut.
pub fn printable(s: &str, max: usize) -> String {
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i == max {
            out.push('…');
            break;
        }
        if c.is_control() || matches!(c, '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}') {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// Longest client-supplied name shown in logs and tables.
pub const NAME_CHARS: usize = 64;

/// Value parsers for clap: every numeric flag of both binaries is checked when it is parsed, and
/// a bad value is refused with the flag and its allowed range (clap exits 2). Use them as
/// `#[arg(long, value_parser = parse::positive(1e3))]`.
pub mod parse {
    use std::fmt::Display;
    use std::str::FromStr;

    fn float(s: &str) -> Result<f64, String> {
        let v: f64 = s.trim().parse().map_err(|_| format!("'{s}' is not a number"))?;
        if !v.is_finite() {
            return Err(format!("{s} is not a finite number"));
        }
        Ok(v)
    }

    /// A finite number in (0, `max`]: a learning rate, a temperature, a norm.
    pub fn positive(max: f64) -> impl Fn(&str) -> Result<f64, String> + Clone + Send + Sync + 'static {
        move |s| {
            let v = float(s)?;
            if v > 0.0 && v <= max {
                Ok(v)
            } else {
                Err(format!("must be greater than 0 and at most {max}"))
            }
        }
    }

    /// As [`positive`], as an `f32`.
    pub fn positive_f32(max: f32) -> impl Fn(&str) -> Result<f32, String> + Clone + Send + Sync + 'static {
        move |s| positive(f64::from(max))(s).map(|v| v as f32)
    }

    /// A finite number in [`min`, `max`] (closed).
    pub fn float_in(min: f64, max: f64) -> impl Fn(&str) -> Result<f64, String> + Clone + Send + Sync + 'static {
        move |s| {
            let v = float(s)?;
            if (min..=max).contains(&v) {
                Ok(v)
            } else {
                Err(format!("must be in [{min}, {max}]"))
            }
        }
    }

    /// A finite number in [`min`, `max`) (a fraction that cannot be all).
    pub fn float_below(min: f64, max: f64) -> impl Fn(&str) -> Result<f64, String> + Clone + Send + Sync + 'static {
        move |s| {
            let v = float(s)?;
            if v >= min && v < max {
                Ok(v)
            } else {
                Err(format!("must be in [{min}, {max})"))
            }
        }
    }

    /// An integer in [`min`, `max`]: counts (rounds, epochs, threads, rows) are at least 1, and
    /// bounded so that no value runs for ever or allocates without end.
    pub fn int_in<T>(min: T, max: T) -> impl Fn(&str) -> Result<T, String> + Clone + Send + Sync + 'static
    where
        T: FromStr + PartialOrd + Display + Copy + Send + Sync + 'static,
    {
        move |s| match s.trim().parse::<T>() {
            Ok(v) if v >= min && v <= max => Ok(v),
            _ => Err(format!("must be a whole number from {min} to {max}")),
        }
    }

    /// Longest duration any flag accepts: ten years.
    pub const MAX_SECONDS: u64 = 10 * 365 * 86_400;

    /// A duration as `30s`, `15m`, `24h`, `7d` or plain seconds, at least one second and at most
    /// [`MAX_SECONDS`]; in seconds.
    pub fn duration(s: &str) -> Result<u64, String> {
        let t = s.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (number, unit) = t.split_at(split);
        let scale = match unit {
            "" | "s" => 1,
            "m" => 60,
            "h" => 3600,
            "d" => 86_400,
            _ => return Err(format!("bad unit in '{s}': use s, m, h or d (examples: 30m, 24h, 7d)")),
        };
        let n: u64 = number.parse().map_err(|_| format!("'{s}' is not a duration (examples: 30m, 24h, 7d)"))?;
        match n.checked_mul(scale) {
            Some(secs) if (1..=MAX_SECONDS).contains(&secs) => Ok(secs),
            _ => Err(format!("must be from 1s to {}d", MAX_SECONDS / 86_400)),
        }
    }

    /// Seconds as a finite number in (0, `max`].
    pub fn seconds(max: f64) -> impl Fn(&str) -> Result<f64, String> + Clone + Send + Sync + 'static {
        move |s| positive(max)(s).map_err(|e| format!("{e} (seconds)"))
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn hostile_values_are_refused_with_the_range() {
            for bad in ["0", "-1", "NaN", "inf", "-inf", "1e999", "x", ""] {
                assert!(positive(10.0)(bad).is_err(), "{bad}");
            }
            assert_eq!(positive(10.0)("0.5"), Ok(0.5));
            assert!(positive(10.0)("11").unwrap_err().contains("at most 10"));
            assert!(float_below(0.0, 1.0)("1").is_err());
            assert_eq!(float_below(0.0, 1.0)("0"), Ok(0.0));
            assert!(float_in(0.0, 1.0)("NaN").is_err());
            assert_eq!(int_in(1u32, 5)("5"), Ok(5));
            for bad in ["0", "-1", "6", "1e3", "NaN", "99999999999999999999999"] {
                assert!(int_in(1u32, 5)(bad).unwrap_err().contains("from 1 to 5"), "{bad}");
            }
            assert_eq!(duration("2h"), Ok(7200));
            assert_eq!(duration("30"), Ok(30));
            for bad in ["0s", "0", "-1h", "5y", "99999999999999999999d", "1e3", "inf"] {
                assert!(duration(bad).is_err(), "{bad}");
            }
        }
    }
}

/// Two malloc arenas instead of glibc's 8 per core, called first thing in `main` of the long-running
/// servers (`fl-coordinator`, `fl-sim`): they allocate and free large buffers (models, decoded
/// updates, per-connection download chunks) on threads that come and go, and per-thread arenas
/// kept that memory (fl-sim's 1,000-client benchmark peaked at 0.78 GiB with the default, 0.49 GiB
/// with two; the coordinator's peak with 16 clients rose 44 MiB over 2 clients with two arenas,
/// 81 to 154 MiB without). `MALLOC_ARENA_MAX` overrides.
pub fn limit_malloc_arenas() {
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: sets an allocator tunable before any other thread exists.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 2);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_cause_is_printed_once() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "Connection refused (os error 111)");
        #[derive(Debug, thiserror::Error)]
        #[error("transport error: {0}")]
        struct Wrapper(#[source] std::io::Error);
        let e = anyhow::Error::new(Wrapper(io)).context("connecting to https://h:1");
        assert_eq!(describe(&e), "connecting to https://h:1: transport error: Connection refused (os error 111)");
        assert_eq!(exit_status(&e, |_| false), exit::TRANSIENT);
        let missing = anyhow::Error::new(std::io::Error::from(std::io::ErrorKind::NotFound)).context("reading x");
        assert_eq!(exit_status(&missing, |_| false), exit::PERMANENT);
        assert_eq!(exit_status(&Permanent::error("bad").context("enrolling"), |_| false), exit::PERMANENT);
    }

    #[test]
    #[allow(clippy::unnecessary_cast)] // `rlim_t` is u64 on Linux, not on every target.
    fn the_open_files_limit_is_raised_to_the_hard_limit() {
        let read = || {
            let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
            // SAFETY: getrlimit writes the struct passed to it.
            assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) }, 0);
            limit
        };
        let before = read();
        let raised = raise_open_files_limit().expect("the limit is readable");
        let after = read();
        assert_eq!(raised, after.rlim_cur as u64, "it returns the limit in force");
        assert!(after.rlim_cur >= before.rlim_cur);
        if before.rlim_max != libc::RLIM_INFINITY {
            assert_eq!(after.rlim_cur, after.rlim_max, "the soft limit is the hard one now");
        }
    }

    #[test]
    fn client_strings_are_escaped_and_capped() {
        assert_eq!(printable("a\nb\x1b[31m", 64), "a\\nb\\u{1b}[31m");
        assert_eq!(printable(&"x".repeat(100), 10), format!("{}…", "x".repeat(10)));
        assert_eq!(printable("émoji 😀", 64), "émoji 😀");
    }
}
