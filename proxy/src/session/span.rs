//! The session's tracing span, `session{id client}`, made the first time the session logs.
//!
//! Making a span is not free: the log formatter writes its fields out at once (the client
//! address alone is ~2,000 instructions), and the span is registered, entered around each poll
//! of what it instruments, and closed — ~8,000 instructions per connection, 16 % of lockguard's
//! user-space work for a session that connects, runs a statement and leaves (README,
//! "Proxy CPU per transaction against PgBouncer's"). Most sessions log nothing at the default
//! level, so the span is made only when an event in it is enabled ([`session_event!`]), or
//! when a rarer path (a lost client, a TLS login relayed on the client's behalf) instruments a
//! future with it. The log lines are the same either way.

use std::net::SocketAddr;
use std::sync::OnceLock;

use tracing::Span;

/// A session's span, made on first use.
pub struct SessionSpan {
    id: u64,
    client: SocketAddr,
    span: OnceLock<Span>,
}

impl SessionSpan {
    pub fn new(id: u64, client: SocketAddr) -> SessionSpan {
        SessionSpan {
            id,
            client,
            span: OnceLock::new(),
        }
    }

    /// The span, made now if it was not yet. A session's span has no parent, wherever it is
    /// first asked for.
    pub fn get(&self) -> &Span {
        self.span.get_or_init(
            || tracing::info_span!(parent: None, "session", id = self.id, client = %self.client),
        )
    }
}

/// `session_event!(span, Level::X, fields..., "message")`: the event inside the session's span,
/// the span made only if the event is enabled.
macro_rules! session_event {
    ($span:expr, $level:expr, $($event:tt)+) => {
        if tracing::enabled!($level) {
            $span.get().in_scope(|| tracing::event!($level, $($event)+));
        }
    };
}
pub(crate) use session_event;

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

    use tracing::level_filters::LevelFilter;
    use tracing::span::{Attributes, Id};
    use tracing::{Event, Level, Subscriber};
    use tracing_subscriber::layer::{Context, SubscriberExt};
    use tracing_subscriber::registry::LookupSpan;
    use tracing_subscriber::Layer;

    use super::*;

    /// Counts the spans made and names the span each event was logged in.
    #[derive(Clone, Default)]
    struct Seen {
        spans: Arc<AtomicUsize>,
        event_spans: Arc<Mutex<Vec<Option<String>>>>,
    }

    impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for Seen {
        fn on_new_span(&self, _: &Attributes<'_>, _: &Id, _: Context<'_, S>) {
            self.spans.fetch_add(1, Ordering::SeqCst);
        }

        fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
            let span = ctx.event_span(event).map(|s| s.name().to_owned());
            self.event_spans.lock().expect("lock").push(span);
        }
    }

    #[test]
    fn the_span_is_made_by_the_first_enabled_event_and_holds_it() {
        let seen = Seen::default();
        let subscriber = tracing_subscriber::registry()
            .with(LevelFilter::INFO)
            .with(seen.clone());
        tracing::subscriber::with_default(subscriber, || {
            let span = SessionSpan::new(7, SocketAddr::from(([10, 0, 0, 1], 5432)));
            session_event!(span, Level::DEBUG, "below the level");
            assert_eq!(
                seen.spans.load(Ordering::SeqCst),
                0,
                "no span for a filtered event"
            );
            session_event!(span, Level::INFO, "logged");
            session_event!(span, Level::WARN, "logged again");
            assert_eq!(seen.spans.load(Ordering::SeqCst), 1, "one span, made once");
        });
        let event_spans = seen.event_spans.lock().expect("lock").clone();
        assert_eq!(
            event_spans,
            [Some("session".to_owned()), Some("session".to_owned())],
            "both events were logged inside the session's span"
        );
    }
}
