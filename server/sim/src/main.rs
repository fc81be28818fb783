//! `fl-sim`: simulate a federation of virtual clients in one process (see the `fl_sim` library).

use std::process::ExitCode;

use clap::Parser;
use tokio_util::sync::CancellationToken;

fn main() -> ExitCode {
    fl_common::cli::limit_malloc_arenas();
    fl_common::cli::init();
    let args = fl_sim::SimArgs::parse();
    match real_main(&args) {
        Ok(code) => code,
        Err(e) => fl_common::cli::report_error(&e, is_permanent),
    }
}

/// Errors that retrying cannot fix (exit 2), beside those `fl_common::cli` knows.
fn is_permanent(e: &(dyn std::error::Error + 'static)) -> bool {
    e.is::<fl_model::data::DataError>()
        || e.is::<fl_common::SpecError>()
        || e.is::<fl_server::dp::DpConfigError>()
        || e.is::<fl_model::partition::PartitionError>()
        || matches!(
            e.downcast_ref::<fl_model::model::ModelError>(),
            Some(fl_model::model::ModelError::Invalid { .. } | fl_model::model::ModelError::Spec(_))
        )
}

fn real_main(args: &fl_sim::SimArgs) -> anyhow::Result<ExitCode> {
    let cancel = CancellationToken::new();
    // The signal watcher runs on its own small runtime; the simulation blocks this thread.
    let signals = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let watcher = {
        let cancel = cancel.clone();
        std::thread::spawn(move || {
            signals.block_on(async move {
                tokio::select! {
                    _ = fl_common::cli::cancel_on_signal(cancel.clone()) => {}
                    _ = cancel.cancelled() => {}
                }
            })
        })
    };
    let outcome = fl_sim::run(args, &cancel);
    let interrupted = cancel.is_cancelled();
    cancel.cancel();
    let _ = watcher.join();
    let outcome = outcome?;
    fl_common::cli::print_line(&fl_sim::summary_table(&args.state_dir)?);
    if interrupted {
        fl_common::cli::eprint_line(&format!(
            "stopped after {} round(s); state saved in {} (run again with the same flags to resume)",
            outcome.completed_rounds,
            args.state_dir.display()
        ));
        return Ok(ExitCode::from(130));
    }
    fl_common::cli::print_line(&format!(
        "{} rounds, {} clients; final model {}",
        outcome.completed_rounds,
        outcome.shard_sizes.len(),
        args.state_dir.join("model").join("final.safetensors").display()
    ));
    Ok(ExitCode::SUCCESS)
}
