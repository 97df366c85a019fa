//! TLS on the gRPC port: the certificate chain, its key and (for mutual TLS) the client CA,
//! read from PEM files and read again when they change, so that a rotated certificate is
//! served to new connections without a restart (connections already open keep theirs).
//!
//! Accepting is ours rather than tonic's (its TLS settings cannot change after start): each
//! accepted socket is handshaken on its own task with the configuration in force, and only
//! finished handshakes reach the server. A client that fails the handshake (plaintext, no or
//! an unknown client certificate) is closed and logged. With mutual TLS the verified client
//! certificate's subject CN travels with the connection ([`TlsPeer`]) for the auth file's
//! `mtls_subject`.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::RootCertStore;
use rustls::server::{ServerConfig, WebPkiClientVerifier};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;
use tracing::{debug, info};

use super::reload::{Reloadable, fingerprint, spawn_reloader};

/// Longest a client may take to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshaken connections waiting for the server to take them.
const ACCEPT_BACKLOG: usize = 128;
/// Handshakes under way at once; beyond it, accepting waits (the kernel's backlog holds
/// further clients), so a flood of clients that never finish costs bounded memory.
const MAX_HANDSHAKES: usize = 1_024;

/// Where the TLS files are.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Set: mutual TLS, clients need a certificate signed by one of these CAs.
    pub client_ca: Option<PathBuf>,
}

/// Why the TLS files cannot be used; names the file.
#[derive(Debug, thiserror::Error)]
#[error("TLS: {0}")]
pub struct TlsError(String);

impl TlsFiles {
    fn paths(&self) -> Vec<PathBuf> {
        let mut paths = vec![self.cert.clone(), self.key.clone()];
        paths.extend(self.client_ca.clone());
        paths
    }

    /// Reads the files into a server configuration (HTTP/2 only, as gRPC needs).
    pub fn load(&self) -> Result<ServerConfig, TlsError> {
        let chain = certificates("--tls-cert", &self.cert)?;
        let not_after = chain.first().and_then(|leaf| {
            let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref()).ok()?;
            Some(cert.validity().not_after.timestamp())
        });
        let key = PrivateKeyDer::from_pem_file(&self.key).map_err(|e| {
            TlsError(format!(
                "--tls-key {}: no usable private key ({e}); expected a PEM PKCS#8, PKCS#1 or \
                 SEC1 key",
                self.key.display()
            ))
        })?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError(e.to_string()))?;
        let builder = match &self.client_ca {
            None => builder.with_no_client_auth(),
            Some(path) => {
                let mut roots = RootCertStore::empty();
                for cert in certificates("--tls-client-ca", path)? {
                    roots.add(cert).map_err(|e| {
                        TlsError(format!(
                            "--tls-client-ca {}: not a usable CA certificate ({e})",
                            path.display()
                        ))
                    })?;
                }
                let verifier = WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
                    .build()
                    .map_err(|e| TlsError(format!("--tls-client-ca {}: {e}", path.display())))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut config = builder.with_single_cert(chain, key).map_err(|e| {
            TlsError(format!(
                "--tls-cert {} with --tls-key {}: {e} (does the key belong to the certificate?)",
                self.cert.display(),
                self.key.display()
            ))
        })?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        if let Some(not_after) = not_after {
            crate::telemetry::metrics::set_certificate_not_after(not_after);
        }
        Ok(config)
    }
}

/// Every certificate in a PEM file; none is an error naming the file.
fn certificates(flag: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
        .map_err(|e| {
            TlsError(format!(
                "{flag} {}: cannot read certificates ({e})",
                path.display()
            ))
        })?;
    if certs.is_empty() {
        return Err(TlsError(format!(
            "{flag} {}: holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
            path.display()
        )));
    }
    Ok(certs)
}

/// The TLS configuration in force, reloaded when its files change.
#[derive(Debug, Clone)]
pub struct Tls {
    config: Arc<Reloadable<Arc<ServerConfig>>>,
    mutual: bool,
}

impl Tls {
    /// Loads the files (an error stops the start) and checks them again every `interval`.
    pub async fn start(files: TlsFiles, interval: Duration) -> Result<Tls, TlsError> {
        let paths = files.paths();
        let seen = fingerprint(&paths).await;
        let config = Arc::new(Reloadable::new(Arc::new(files.load()?)));
        let mutual = files.client_ca.is_some();
        spawn_reloader("tls", paths, seen, interval, &config, move || {
            files.load().map(Arc::new)
        });
        Ok(Tls { config, mutual })
    }

    /// Whether clients must present a certificate.
    pub fn mutual(&self) -> bool {
        self.mutual
    }

    /// Accepts connections on `listener` and handshakes each; the stream yields those that
    /// succeeded, for `serve_with_incoming`. Accepting stops when the stream is dropped.
    pub fn incoming(
        &self,
        listener: TcpListener,
        keepalive: Duration,
    ) -> ReceiverStream<io::Result<TlsConn>> {
        let (tx, rx) = mpsc::channel(ACCEPT_BACKLOG);
        let tls = self.clone();
        let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
        tokio::spawn(async move {
            loop {
                let permit = tokio::select! {
                    permit = handshakes.clone().acquire_owned() => match permit {
                        Ok(p) => p,
                        Err(_) => return,
                    },
                    _ = tx.closed() => return,
                };
                let accepted = tokio::select! {
                    accepted = listener.accept() => accepted,
                    _ = tx.closed() => return,
                };
                let (socket, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors and the like: back off rather than spin.
                        debug!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = socket.set_nodelay(true);
                let _ = socket2::SockRef::from(&socket)
                    .set_tcp_keepalive(&socket2::TcpKeepalive::new().with_time(keepalive));
                let acceptor = TlsAcceptor::from(tls.config.get().as_ref().clone());
                let tx = tx.clone();
                let mutual = tls.mutual;
                tokio::spawn(async move {
                    let _permit = permit;
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(socket)).await {
                        Ok(Ok(stream)) => {
                            let conn = TlsConn::new(stream, peer, mutual);
                            let _ = tx.send(Ok(conn)).await;
                        }
                        Ok(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => {
                            debug!(%peer, "connection closed before its TLS handshake finished");
                        }
                        Ok(Err(e)) => {
                            info!(%peer, error = %e, "TLS handshake failed; connection closed");
                        }
                        Err(_) => {
                            info!(%peer, "TLS handshake took longer than 10s; connection closed");
                        }
                    }
                });
            }
        });
        ReceiverStream::new(rx)
    }
}

/// Who is at the other end of a TLS connection.
#[derive(Debug, Clone)]
pub struct TlsPeer {
    pub remote_addr: SocketAddr,
    /// The subject CN of the client certificate, verified against --tls-client-ca.
    pub subject: Option<Arc<str>>,
}

/// A connection whose handshake finished.
pub struct TlsConn {
    stream: TlsStream<TcpStream>,
    peer: TlsPeer,
}

impl TlsConn {
    fn new(stream: TlsStream<TcpStream>, remote_addr: SocketAddr, mutual: bool) -> TlsConn {
        let subject = if mutual {
            stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|chain| chain.first())
                .and_then(|leaf| subject_cn(leaf.as_ref()))
                .map(Arc::from)
        } else {
            None
        };
        TlsConn {
            stream,
            peer: TlsPeer {
                remote_addr,
                subject,
            },
        }
    }
}

/// The common name of a DER certificate's subject; None unless there is exactly one and it
/// is text (several CNs are ambiguous: other tools may pick another one).
pub fn subject_cn(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let mut names = cert.subject().iter_common_name();
    let cn = names.next()?;
    if names.next().is_some() {
        debug!("client certificate has several subject CNs; it names no principal");
        return None;
    }
    cn.as_str().ok().map(str::to_string)
}

impl Connected for TlsConn {
    type ConnectInfo = TlsPeer;

    fn connect_info(&self) -> TlsPeer {
        self.peer.clone()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn certificate(cn: Option<&str>) -> Vec<u8> {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params =
            rcgen::CertificateParams::new(vec!["localhost".to_string()]).expect("params");
        params.distinguished_name = rcgen::DistinguishedName::new();
        if let Some(cn) = cn {
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, cn);
        }
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, "tickd tests");
        params
            .self_signed(&key)
            .expect("certificate")
            .der()
            .to_vec()
    }

    #[test]
    fn the_subject_cn_names_the_principal() {
        assert_eq!(
            subject_cn(&certificate(Some("billing-worker"))).as_deref(),
            Some("billing-worker")
        );
        assert_eq!(subject_cn(&certificate(None)), None);
        assert_eq!(subject_cn(b"not a certificate"), None);
    }
}
