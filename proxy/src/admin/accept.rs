//! Admission to the admin front ends: both accept anyone who can reach their port before any
//! login, so each serves a bounded number of connections at once and turns the next ones away
//! with an answer in its own protocol. Without a bound, a flood of idle connections to an
//! admin port would use up file descriptors the proxy's clients share.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

/// Turn-aways under way at once; past that an extra connection is just closed.
const MAX_REFUSALS: usize = 16;

/// How long a turn-away waits for the client's request, so that closing does not reset the
/// connection before the client has read why.
const REFUSAL_LINGER: Duration = Duration::from_secs(1);

/// How much of a turned-away client's request is read (and dropped) before closing.
const REFUSAL_DRAIN: usize = 16 * 1024;

/// One admin front end's admission policy.
pub struct Admission {
    /// Named in logs: "admin console", "admin HTTP".
    pub name: &'static str,
    /// Connections served at once.
    pub limit: usize,
    /// The complete answer a connection over `limit` gets before it is closed.
    pub refusal: Vec<u8>,
}

/// Accepts connections until `stop` is cancelled and runs `serve` for each while fewer than
/// `admission.limit` are open; then waits for the open ones (`serve` watches `stop` itself,
/// to end them the way its protocol ends a connection).
pub async fn serve_connections<F, Fut>(
    listener: TcpListener,
    admission: Admission,
    stop: CancellationToken,
    mut serve: F,
) where
    F: FnMut(TcpStream, SocketAddr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(admission.limit));
    let refusals = Arc::new(Semaphore::new(MAX_REFUSALS));
    let refusal: Arc<[u8]> = admission.refusal.into();
    let connections = TaskTracker::new();
    loop {
        let (socket, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // EMFILE and the like: back off instead of spinning on the error.
                    warn!(error = %e, "{} accept failed", admission.name);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = stop.cancelled() => break,
        };
        let _ = socket.set_nodelay(true);
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            debug!(%peer, limit = admission.limit, "{} connection refused: too many", admission.name);
            if let Ok(refusing) = Arc::clone(&refusals).try_acquire_owned() {
                let refusal = Arc::clone(&refusal);
                connections.spawn(async move {
                    turn_away(socket, &refusal).await;
                    drop(refusing);
                });
            }
            continue;
        };
        let served = serve(socket, peer);
        connections.spawn(async move {
            served.await;
            drop(slot);
        });
    }
    connections.close();
    connections.wait().await;
}

/// Sends `answer`, then closes the connection, within about a second: what every port of
/// lockguard does with a connection over its limit.
pub(crate) async fn turn_away(mut socket: TcpStream, answer: &[u8]) {
    let _ = tokio::time::timeout(REFUSAL_LINGER, async {
        socket.write_all(answer).await?;
        socket.shutdown().await?;
        // Read what the client sends until it hangs up: closing with its bytes unread would
        // reset the connection, and the client could lose the answer.
        let mut sink = [0u8; 1024];
        let mut drained = 0;
        while drained < REFUSAL_DRAIN {
            match socket.read(&mut sink).await? {
                0 => break,
                n => drained += n,
            }
        }
        Ok::<_, std::io::Error>(())
    })
    .await;
}
