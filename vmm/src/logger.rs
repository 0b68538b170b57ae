//! The process logger: `tracing` events formatted on stderr, or on the file or named pipe
//! that `--log-path` or `PUT /logger` names, with the level, the source location and a
//! module filter changeable at run time as Firecracker's logger allows.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use tracing::level_filters::LevelFilter;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::fmt::format::{DefaultFields, Format};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::{Layered, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, Registry};

use crate::resources::{LogLevel, Logger};

/// Errors of (re)configuring the logger.
#[derive(Debug, thiserror::Error)]
pub enum LoggerError {
    /// The log file cannot be opened.
    #[error("log_path: cannot open {}", .0.display())]
    Open(PathBuf, #[source] std::io::Error),
    /// The module filter is not a module path.
    #[error("module: {0:?} is not a module path")]
    Module(String),
    /// The logger was never initialised (a library use without [`init`]).
    #[error("the logger is not initialised")]
    NotInitialised,
    /// Applying the new settings failed.
    #[error("cannot apply the logger settings: {0}")]
    Reload(String),
}

type Sink = Arc<Mutex<Box<dyn Write + Send>>>;

/// Hands the formatter a writer on the current sink.
#[derive(Clone)]
struct SharedSink(Sink);

/// One event's writes, to the sink current when the event started.
struct SinkGuard(Sink);

impl Write for SinkGuard {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).flush()
    }
}

impl<'a> MakeWriter<'a> for SharedSink {
    type Writer = SinkGuard;
    fn make_writer(&'a self) -> SinkGuard {
        SinkGuard(self.0.clone())
    }
}

type Base = Layered<reload::Layer<Targets, Registry>, Registry>;
type FmtLayer = tracing_subscriber::fmt::Layer<Base, DefaultFields, Format, SharedSink>;

struct Handles {
    filter: reload::Handle<Targets, Registry>,
    format: reload::Handle<FmtLayer, Base>,
    sink: Sink,
}

static HANDLES: OnceLock<Handles> = OnceLock::new();

fn fmt_layer(sink: &Sink, ansi: bool, show_level: bool, show_origin: bool) -> FmtLayer {
    tracing_subscriber::fmt::layer()
        .with_writer(SharedSink(sink.clone()))
        .with_ansi(ansi)
        .with_target(false)
        .with_level(show_level)
        .with_file(show_origin)
        .with_line_number(show_origin)
}

/// Installs the process logger on stderr at `level`; `log_path` redirects it at once.
pub fn init(level: LevelFilter, ansi: bool, log_path: Option<&Path>) -> Result<(), LoggerError> {
    let sink: Sink = Arc::new(Mutex::new(Box::new(std::io::stderr())));
    let (filter, filter_handle) = reload::Layer::new(Targets::new().with_default(level));
    let (format, format_handle) = reload::Layer::new(fmt_layer(&sink, ansi, true, false));
    // A second initialisation (tests) keeps the first logger.
    if tracing_subscriber::registry()
        .with(filter)
        .with(format)
        .try_init()
        .is_ok()
    {
        let _ = HANDLES.set(Handles {
            filter: filter_handle,
            format: format_handle,
            sink,
        });
    }
    if let Some(path) = log_path {
        configure(&Logger {
            log_path: Some(path.to_path_buf()),
            level: None,
            show_level: true,
            show_log_origin: false,
            module: None,
        })?;
    }
    Ok(())
}

fn level_filter(level: LogLevel) -> LevelFilter {
    match level {
        LogLevel::Off => LevelFilter::OFF,
        LogLevel::Error => LevelFilter::ERROR,
        LogLevel::Warning => LevelFilter::WARN,
        LogLevel::Info => LevelFilter::INFO,
        LogLevel::Debug => LevelFilter::DEBUG,
        LogLevel::Trace => LevelFilter::TRACE,
    }
}

/// Checks a `PUT /logger` body without applying it (opens nothing).
pub fn validate(logger: &Logger) -> Result<(), LoggerError> {
    if let Some(module) = &logger.module {
        let ok = !module.is_empty()
            && module.split("::").all(|part| {
                !part.is_empty() && part.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
            });
        if !ok {
            return Err(LoggerError::Module(module.clone()));
        }
    }
    Ok(())
}

/// Applies a `PUT /logger` body: opens the log file or pipe (appending; a named pipe must
/// have a reader) and switches level, format and module filter. Nothing changes on error.
pub fn configure(logger: &Logger) -> Result<(), LoggerError> {
    validate(logger)?;
    let handles = HANDLES.get().ok_or(LoggerError::NotInitialised)?;
    let file = logger
        .log_path
        .as_ref()
        .map(|path| {
            OpenOptions::new()
                .append(true)
                .create(true)
                .open(path)
                .map_err(|e| LoggerError::Open(path.clone(), e))
        })
        .transpose()?;
    let level = logger.level.map(level_filter).unwrap_or(LevelFilter::INFO);
    let targets = match &logger.module {
        Some(module) => Targets::new().with_target(module.clone(), level),
        None => Targets::new().with_default(level),
    };
    let ansi = file.is_none() && std::io::IsTerminal::is_terminal(&std::io::stderr());
    let layer = fmt_layer(
        &handles.sink,
        ansi,
        logger.show_level,
        logger.show_log_origin,
    );
    handles
        .format
        .reload(layer)
        .map_err(|e| LoggerError::Reload(e.to_string()))?;
    handles
        .filter
        .reload(targets)
        .map_err(|e| LoggerError::Reload(e.to_string()))?;
    if let Some(file) = file {
        *handles.sink.lock().unwrap_or_else(|p| p.into_inner()) = Box::new(file);
    }
    Ok(())
}
