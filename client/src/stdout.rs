//! Output of the command-line tools (`timeline-cli`, `timeline-placement`,
//! `timeline-bench`): a line to stdout, or a quiet exit once the reader
//! has gone (`timeline-cli cluster-map | head -3`). `println!` panics on a
//! closed pipe; a reader that has seen enough is not an error.

use std::io::Write;

/// Write `args` and a newline to stdout; exit 0 if the reader closed the
/// pipe, 1 (with a message) on any other failure.
pub fn line(args: std::fmt::Arguments<'_>) {
    if let Err(e) = writeln!(std::io::stdout().lock(), "{args}") {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("(error) writing the output: {e}");
        std::process::exit(1);
    }
}

/// `println!` through [`line`].
#[macro_export]
macro_rules! outln {
    () => {
        $crate::stdout::line(format_args!(""))
    };
    ($($t:tt)*) => {
        $crate::stdout::line(format_args!($($t)*))
    };
}
