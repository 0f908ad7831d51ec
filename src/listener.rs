//! What memcached clients connect to: a TCP address, a unix domain socket,
//! or both at once. This module owns the socket file: one left behind by a
//! crash is replaced, one a live server accepts on is left alone (start-up
//! fails), and ours is removed when we stop listening.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::task::{Context, Poll};

use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};

use crate::config::SocketMode;

/// A bound listener of either kind.
pub enum Listener {
    Tcp(TcpListener),
    /// The socket file is removed when this is dropped.
    Unix(UnixListener, SocketFile),
}

/// An accepted connection.
pub enum Accepted {
    Tcp(TcpStream, SocketAddr),
    Unix(UnixStream),
}

impl Accepted {
    pub fn peer(&self) -> Peer {
        match self {
            Accepted::Tcp(_, addr) => Peer::Tcp(*addr),
            Accepted::Unix(_) => Peer::Unix,
        }
    }
}

/// Who is at the other end, for log lines.
#[derive(Debug, Clone, Copy)]
pub enum Peer {
    Tcp(SocketAddr),
    /// Unix peers are unnamed: the client's socket is not bound to a path.
    Unix,
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Peer::Tcp(addr) => addr.fmt(f),
            Peer::Unix => f.write_str("unix"),
        }
    }
}

impl Listener {
    pub async fn bind_tcp(addr: SocketAddr) -> Result<Listener, String> {
        TcpListener::bind(addr)
            .await
            .map(Listener::Tcp)
            .map_err(|e| format!("cannot listen on {addr}: {e}"))
    }

    /// Binds a unix socket at `path` with permissions `mode`, replacing a
    /// stale socket file but never a live one or a file of another kind.
    pub fn bind_unix(path: &Path, mode: SocketMode) -> Result<Listener, String> {
        let shown = path.display();
        remove_stale(path)?;
        let listener =
            UnixListener::bind(path).map_err(|e| format!("cannot listen on {shown}: {e}"))?;
        // The file exists with the umask's bits (usually 0755, which lets
        // no one else connect: that takes write permission) until this
        // chmod. The directory's own mode is the first gate anyway; the
        // deployment examples put the socket in a directory of its own.
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode.0))
            .map_err(|e| format!("cannot set mode {mode} on {shown}: {e}"))?;
        let file = SocketFile::of(path).map_err(|e| format!("{shown}: {e}"))?;
        Ok(Listener::Unix(listener, file))
    }

    pub fn poll_accept(&self, cx: &mut Context<'_>) -> Poll<io::Result<Accepted>> {
        match self {
            Listener::Tcp(l) => l.poll_accept(cx).map_ok(|(s, a)| Accepted::Tcp(s, a)),
            Listener::Unix(l, _) => l.poll_accept(cx).map_ok(|(s, _)| Accepted::Unix(s)),
        }
    }

    /// The bound TCP address (None for a unix socket).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        match self {
            Listener::Tcp(l) => l.local_addr().ok(),
            Listener::Unix(..) => None,
        }
    }

    /// Where clients connect, for log lines.
    pub fn describe(&self) -> String {
        match self {
            Listener::Tcp(l) => l
                .local_addr()
                .map_or_else(|_| "tcp".into(), |a| a.to_string()),
            Listener::Unix(_, file) => format!("unix:{}", file.path.display()),
        }
    }
}

/// Accepts a connection on whichever of `listeners` has one, taking turns
/// (from `*turn` on) so a busy listener cannot starve the others.
pub async fn accept_any(listeners: &[Listener], turn: &mut usize) -> io::Result<Accepted> {
    std::future::poll_fn(|cx| {
        for i in 0..listeners.len() {
            let at = (*turn + i) % listeners.len();
            if let Poll::Ready(accepted) = listeners[at].poll_accept(cx) {
                *turn = at + 1;
                return Poll::Ready(accepted);
            }
        }
        Poll::Pending
    })
    .await
}

impl From<TcpListener> for Listener {
    fn from(listener: TcpListener) -> Listener {
        Listener::Tcp(listener)
    }
}

/// Removes a socket file nothing accepts on (a crashed run's); refuses to
/// touch a live socket or anything that is not a socket.
fn remove_stale(path: &Path) -> Result<(), String> {
    let shown = path.display();
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(format!("cannot inspect {shown}: {e}")),
    };
    if !meta.file_type().is_socket() {
        return Err(format!(
            "{shown} exists and is not a socket; not replacing it"
        ));
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Err(format!(
            "{shown}: another server accepts connections on it (a second dynacache?); stop it or set another unix_socket"
        )),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            std::fs::remove_file(path)
                .map_err(|e| format!("cannot remove stale socket {shown}: {e}"))?;
            tracing::info!(path = %shown, "removed a stale socket file (a previous run did not exit cleanly)");
            Ok(())
        }
        Err(e) => Err(format!("cannot tell whether {shown} is in use: {e}")),
    }
}

/// Our socket file, removed on drop if it is still ours (not replaced by
/// another process since we bound it).
pub struct SocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl SocketFile {
    fn of(path: &Path) -> io::Result<SocketFile> {
        let meta = std::fs::symlink_metadata(path)?;
        Ok(SocketFile {
            path: path.to_path_buf(),
            dev: meta.dev(),
            ino: meta.ino(),
        })
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        let ours = std::fs::symlink_metadata(&self.path)
            .is_ok_and(|m| m.dev() == self.dev && m.ino() == self.ino);
        if ours && let Err(e) = std::fs::remove_file(&self.path) {
            tracing::warn!(path = %self.path.display(), error = %e, "cannot remove the socket file");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn stale_socket_is_replaced_live_one_and_other_files_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.sock");
        // A stale file: bound, then closed without removing it.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let listener = Listener::bind_unix(&path, SocketMode(0o660)).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o660);

        let err = Listener::bind_unix(&path, SocketMode(0o700))
            .err()
            .expect("a live socket is not replaced");
        assert!(err.contains("another server"), "{err}");
        assert!(path.exists(), "the live socket is left alone");

        drop(listener);
        assert!(!path.exists(), "removed when we stop listening");

        std::fs::write(&path, "not a socket").unwrap();
        let err = Listener::bind_unix(&path, SocketMode(0o700))
            .err()
            .expect("a regular file is not replaced");
        assert!(err.contains("not a socket"), "{err}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "not a socket");
    }

    #[tokio::test]
    async fn a_replaced_socket_file_is_not_removed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.sock");
        let ours = Listener::bind_unix(&path, SocketMode(0o700)).unwrap();
        // Someone else removes it and binds their own at the same path.
        std::fs::remove_file(&path).unwrap();
        let _theirs = std::os::unix::net::UnixListener::bind(&path).unwrap();
        drop(ours);
        assert!(path.exists(), "another process's socket is left alone");
    }
}
