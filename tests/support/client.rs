//! Helpers around the wsbeat client itself: a fixed-delay reconnect policy, and a
//! panic counter for the client's own threads (their panics are not surfaced otherwise).

use std::sync::Once;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::time::Duration;

use wsbeat::{Failure, ReconnectPolicy};

/// Retries after the same delay, forever, whatever happened.
pub struct Fixed(pub Duration);

impl ReconnectPolicy for Fixed {
    fn next_delay(&mut self, _: &Failure<'_>) -> Option<Duration> {
        Some(self.0)
    }
}

static WSBEAT_PANICS: AtomicUsize = AtomicUsize::new(0);

/// Starts counting panics in threads named `wsbeat-*` (idempotent).
pub fn watch_panics() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if std::thread::current()
                .name()
                .is_some_and(|n| n.starts_with("wsbeat-"))
            {
                WSBEAT_PANICS.fetch_add(1, SeqCst);
            }
            previous(info);
        }));
    });
}

/// Panics seen in `wsbeat-*` threads since [`watch_panics`].
pub fn client_panics() -> usize {
    WSBEAT_PANICS.load(SeqCst)
}
