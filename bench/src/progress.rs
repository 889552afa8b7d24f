//! Progress bars for the phases of a run (indicatif, on stderr; hidden when
//! stderr is not a terminal, so logs and `--json` pipelines stay clean).

use indicatif::{ProgressBar, ProgressStyle};
use std::time::Duration;

/// A spinner for a phase of unknown length.
pub fn spinner(msg: impl Into<String>) -> ProgressBar {
    let pb = ProgressBar::new_spinner().with_message(msg.into());
    pb.set_style(
        ProgressStyle::with_template("{spinner} {msg} [{elapsed}]")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    pb.enable_steady_tick(Duration::from_millis(100));
    pb
}

/// A bar over `len` units (`unit`: what is counted).
pub fn bar(len: u64, msg: impl Into<String>, unit: &str) -> ProgressBar {
    let pb = ProgressBar::new(len).with_message(msg.into());
    let t = format!(
        "{{msg:>10}} [{{bar:40}}] {{human_pos}}/{{human_len}} {unit} ({{per_sec}}, eta {{eta}})"
    );
    pb.set_style(
        ProgressStyle::with_template(&t)
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    pb
}
