//! HBONE on real loopback sockets: bytes intact, identities checked both ways, pooling, and
//! every kind of bad peer refused without harming the others.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use mesh::hbone::{
    ClientConfig, ConnectRequest, HboneAuthority, HboneClient, ServerConfig, forwarded_header,
    headers,
};
use mesh::identity::Identity;
use mesh_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

struct Setup {
    pki: TestPki,
    client: HboneClient,
    client_id: Identity,
    server_id: Identity,
    hbone: SocketAddr,
    seen: tokio::sync::mpsc::UnboundedReceiver<SeenTunnel>,
    _stop: tokio_util::sync::DropGuard,
}

async fn setup(client_config: ClientConfig, server_config: ServerConfig) -> Setup {
    init_tracing();
    let pki = TestPki::new(TRUST_DOMAIN);
    let client_id = pki.id("client-ns", "client-sa");
    let server_id = pki.id("server-ns", "server-sa");
    let (hbone, seen, stop) = start_forwarding_hbone(pki.cert(&server_id), server_config).await;
    let certs = StaticCerts::default().with(pki.cert(&client_id));
    let client = HboneClient::new(client_config, Arc::new(certs));
    Setup {
        pki,
        client,
        client_id,
        server_id,
        hbone,
        seen,
        _stop: stop.drop_guard(),
    }
}

impl Setup {
    fn request(&self, target: SocketAddr) -> ConnectRequest {
        ConnectRequest {
            source: self.client_id.clone(),
            destination: self.server_id.clone(),
            hbone_addr: self.hbone,
            authority: HboneAuthority(target),
            headers: http::HeaderMap::new(),
        }
    }
}

#[tokio::test]
async fn round_trip_with_identities_and_headers() {
    let mut s = setup(ClientConfig::default(), ServerConfig::default()).await;
    let echo = start_echo().await;
    let mut req = s.request(echo);
    let original_client: SocketAddr = "10.0.0.7:41000".parse().unwrap();
    req.headers.insert(
        headers::FORWARDED,
        forwarded_header(original_client, Some("echo.default.svc.cluster.local"))
            .parse()
            .unwrap(),
    );
    req.headers.insert(
        headers::BAGGAGE,
        "k8s.namespace.name=client-ns".parse().unwrap(),
    );
    let mut tunnel = s.client.connect(req).await.expect("tunnel");
    tunnel.write_all(b"ping over hbone").await.unwrap();
    let mut buf = [0u8; 15];
    tunnel.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping over hbone");

    let seen = s.seen.recv().await.unwrap();
    assert_eq!(
        seen.peer_identity, s.client_id,
        "server sees the client's SPIFFE identity"
    );
    assert_eq!(seen.authority, echo);
    assert_eq!(
        mesh::hbone::forwarded_for(&seen.headers),
        Some(original_client)
    );
    assert_eq!(
        seen.headers.get(headers::BAGGAGE).unwrap(),
        "k8s.namespace.name=client-ns"
    );
    let tp = seen
        .headers
        .get(headers::TRACEPARENT)
        .expect("traceparent added");
    assert_eq!(tp.to_str().unwrap().len(), 55);
}

#[tokio::test]
async fn one_gib_each_way_checksummed() {
    const LEN: u64 = 1 << 30;
    let s = setup(ClientConfig::default(), ServerConfig::default()).await;
    let (target, mut results) = start_checksum_server(LEN, 0xBEEF).await;
    let tunnel = s.client.connect(s.request(target)).await.expect("tunnel");
    let (mut r, mut w) = tokio::io::split(tunnel);
    let (sent, received) = tokio::join!(send_pattern(&mut w, LEN, 0xCAFE), receive_hash(&mut r));
    let sent_hash = sent.expect("send 1 GiB");
    let (received_len, received_hash) = received.expect("receive 1 GiB");
    let (server_got, server_got_hash, server_sent_hash) = results.recv().await.unwrap();
    assert_eq!(server_got, LEN, "server received every byte");
    assert_eq!(server_got_hash, sent_hash, "client->server bytes intact");
    assert_eq!(received_len, LEN, "client received every byte");
    assert_eq!(
        received_hash, server_sent_hash,
        "server->client bytes intact"
    );
}

#[tokio::test]
async fn thousand_concurrent_tunnels_share_pooled_connections() {
    let s = setup(ClientConfig::default(), ServerConfig::default()).await;
    let echo = start_echo().await;
    let barrier = Arc::new(tokio::sync::Barrier::new(1000));
    let mut tasks = Vec::new();
    for i in 0..1000u32 {
        let client = s.client.clone();
        let req = s.request(echo);
        let barrier = barrier.clone();
        tasks.push(tokio::spawn(async move {
            let mut t = client.connect(req).await.expect("tunnel");
            let msg = format!("tunnel {i:04}");
            t.write_all(msg.as_bytes()).await.unwrap();
            let mut buf = vec![0u8; msg.len()];
            t.read_exact(&mut buf).await.unwrap();
            assert_eq!(buf, msg.as_bytes());
            // Hold every tunnel open until all 1000 are up at once.
            barrier.wait().await;
            t.shutdown().await.unwrap();
            let mut rest = Vec::new();
            t.read_to_end(&mut rest).await.unwrap();
            assert!(rest.is_empty());
        }));
    }
    let connections_seen = s.client.connection_count();
    for t in tasks {
        t.await.unwrap();
    }
    let conns = s.client.connection_count();
    assert_eq!(
        conns, 10,
        "1000 concurrent tunnels at 100 streams per connection need exactly 10 connections \
         (saw {connections_seen} while opening)"
    );
}

#[tokio::test]
async fn half_close_each_way() {
    let s = setup(ClientConfig::default(), ServerConfig::default()).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target = listener.local_addr().unwrap();

    // Client closes its sending side first; the server can still answer afterwards.
    let mut tunnel = s.client.connect(s.request(target)).await.unwrap();
    let (mut upstream, _) = listener.accept().await.unwrap();
    tunnel.write_all(b"request").await.unwrap();
    tunnel.shutdown().await.unwrap();
    let mut got = Vec::new();
    upstream.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"request", "server reads the request then EOF");
    upstream
        .write_all(b"response after client FIN")
        .await
        .unwrap();
    upstream.shutdown().await.unwrap();
    let mut back = Vec::new();
    tunnel.read_to_end(&mut back).await.unwrap();
    assert_eq!(back, b"response after client FIN");

    // Server closes its sending side first; the client can still send afterwards.
    let mut tunnel = s.client.connect(s.request(target)).await.unwrap();
    let (mut upstream, _) = listener.accept().await.unwrap();
    upstream.write_all(b"banner").await.unwrap();
    upstream.shutdown().await.unwrap();
    let mut banner = Vec::new();
    tunnel.read_to_end(&mut banner).await.unwrap();
    assert_eq!(banner, b"banner", "client reads then EOF");
    tunnel.write_all(b"client still talking").await.unwrap();
    tunnel.shutdown().await.unwrap();
    let mut got = Vec::new();
    upstream.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"client still talking");
}

#[tokio::test]
async fn unreachable_upstream_gets_503() {
    let s = setup(ClientConfig::default(), ServerConfig::default()).await;
    // Bind then drop to get a port with nothing listening.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let err = s.client.connect(s.request(closed)).await.unwrap_err();
    assert_eq!(
        err.status(),
        Some(http::StatusCode::SERVICE_UNAVAILABLE),
        "{err}"
    );
    // The connection stays usable for the next tunnel.
    let echo = start_echo().await;
    let mut t = s.client.connect(s.request(echo)).await.unwrap();
    t.write_all(b"x").await.unwrap();
    let mut b = [0u8; 1];
    t.read_exact(&mut b).await.unwrap();
    assert_eq!(s.client.connection_count(), 1);
}

#[tokio::test]
async fn client_rejects_server_without_expected_identity() {
    let s = setup(ClientConfig::default(), ServerConfig::default()).await;
    let echo = start_echo().await;
    let mut req = s.request(echo);
    req.destination = s.pki.id("server-ns", "someone-else");
    let err = s.client.connect(req).await.unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(err, mesh::hbone::HboneError::Tls { .. }),
        "expected a TLS failure, got {msg}"
    );
    assert!(
        msg.contains("someone-else"),
        "error names the expected identity: {msg}"
    );
}

/// Opens a raw TLS connection presenting `cert` (or none) and tries one CONNECT.
async fn raw_attempt(
    hbone: SocketAddr,
    client_cert: Option<Arc<mesh::tls::WorkloadCertificate>>,
    trust: &TestPki,
    server_id: &Identity,
) -> Result<http::StatusCode, String> {
    let tcp = TcpStream::connect(hbone).await.map_err(|e| e.to_string())?;
    let config = match client_cert {
        Some(c) => c.client_config(vec![server_id.clone()]),
        None => {
            // Trusts the server properly but offers no client certificate.
            let helper = trust.cert(&trust.id("x", "y"));
            let mut c = (*helper.client_config(vec![server_id.clone()])).clone();
            c.client_auth_cert_resolver = Arc::new(NoClientCert);
            Arc::new(c)
        }
    };
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(mesh::tls::unused_server_name(), tcp)
        .await
        .map_err(|e| format!("tls: {e}"))?;
    let (mut send, conn) = h2::client::handshake(tls)
        .await
        .map_err(|e| format!("h2: {e}"))?;
    tokio::spawn(conn);
    let req = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri("127.0.0.1:1")
        .body(())
        .unwrap();
    let (resp, _) = send
        .send_request(req, false)
        .map_err(|e| format!("h2: {e}"))?;
    let resp = resp.await.map_err(|e| format!("h2: {e}"))?;
    Ok(resp.status())
}

#[derive(Debug)]
struct NoClientCert;
impl rustls::client::ResolvesClientCert for NoClientCert {
    fn resolve(
        &self,
        _: &[&[u8]],
        _: &[rustls::SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        None
    }
    fn has_certs(&self) -> bool {
        false
    }
}

#[tokio::test]
async fn server_rejects_bad_client_certificates() {
    let s = setup(ClientConfig::default(), ServerConfig::default()).await;
    let other_root = TestPki::new(TRUST_DOMAIN);
    let other_domain = id("other.domain", "client-ns", "client-sa");
    // Every bad client still trusts our server's root, so the server is the one refusing.
    let now = SystemTime::now();
    let hour = Duration::from_secs(3600);
    // (case, certificate, the TLS alert the server must send)
    let cases: Vec<(&str, Option<Arc<mesh::tls::WorkloadCertificate>>, &str)> = vec![
        ("no certificate", None, "CertificateRequired"),
        (
            "another root",
            Some(other_root.cert_trusting(&s.client_id, now - hour, now + hour, &s.pki)),
            // Both roots share a subject, so the signature check is what fails.
            "DecryptError",
        ),
        (
            "expired",
            Some(
                s.pki
                    .cert_with_validity(&s.client_id, now - 2 * hour, now - hour),
            ),
            "CertificateExpired",
        ),
        (
            "another trust domain",
            Some(
                s.pki
                    .cert_with_validity(&other_domain, now - hour, now + hour),
            ),
            "HandshakeFailure",
        ),
    ];
    for (name, cert, alert) in cases {
        let result = raw_attempt(s.hbone, cert, &s.pki, &s.server_id).await;
        let err = result.expect_err(&format!("{name}: must be refused"));
        assert!(
            err.contains(alert),
            "{name}: expected alert {alert}, got {err}"
        );
    }
    // And a good client still gets through on the same server.
    let echo = start_echo().await;
    let good = raw_attempt(
        s.hbone,
        Some(s.pki.cert(&s.client_id)),
        &s.pki,
        &s.server_id,
    )
    .await;
    assert!(good.is_ok(), "good client: {good:?}");
    let mut t = s.client.connect(s.request(echo)).await.unwrap();
    t.write_all(b"ok").await.unwrap();
}

#[tokio::test]
async fn garbage_and_plaintext_refused_without_harming_others() {
    let s = setup(ClientConfig::default(), ServerConfig::default()).await;
    let echo = start_echo().await;
    // An established tunnel before the garbage arrives.
    let mut live = s.client.connect(s.request(echo)).await.unwrap();
    for junk in [
        &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..],
        &b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"[..],
        &[0x16, 0x03, 0x01, 0xff, 0xff, 0x01, 0, 0][..],
        &[0u8; 4096][..],
    ] {
        let mut raw = TcpStream::connect(s.hbone).await.unwrap();
        let _ = raw.write_all(junk).await;
        let mut buf = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), raw.read_to_end(&mut buf)).await;
        assert!(
            read.is_ok(),
            "server must close a garbage connection, not hang"
        );
        assert!(
            !String::from_utf8_lossy(&buf).contains("HTTP/1.1 200"),
            "no HTTP success for plaintext"
        );
    }
    live.write_all(b"still alive").await.unwrap();
    let mut buf = [0u8; 11];
    live.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"still alive");
}

#[tokio::test]
async fn stalled_handshake_times_out_without_blocking_others() {
    let server_config = ServerConfig {
        handshake_timeout: Duration::from_millis(300),
        ..ServerConfig::default()
    };
    let s = setup(ClientConfig::default(), server_config).await;
    let echo = start_echo().await;
    let mut stalled = TcpStream::connect(s.hbone).await.unwrap();
    // Half a ClientHello, then silence.
    stalled
        .write_all(&[0x16, 0x03, 0x01, 0x02, 0x00])
        .await
        .unwrap();
    let mut t = s
        .client
        .connect(s.request(echo))
        .await
        .expect("others still served");
    t.write_all(b"x").await.unwrap();
    let mut buf = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), stalled.read_to_end(&mut buf)).await;
    assert!(
        closed.is_ok(),
        "stalled peer is cut off after the handshake timeout"
    );
}

async fn h2_request(
    s: &Setup,
    build: impl FnOnce() -> http::Request<()>,
) -> Result<http::StatusCode, String> {
    let cert = s.pki.cert(&s.client_id);
    let tcp = TcpStream::connect(s.hbone).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(cert.client_config(vec![s.server_id.clone()]))
        .connect(mesh::tls::unused_server_name(), tcp)
        .await
        .unwrap();
    let (mut send, conn) = h2::client::handshake(tls).await.unwrap();
    tokio::spawn(conn);
    let (resp, _) = send
        .send_request(build(), false)
        .map_err(|e| e.to_string())?;
    resp.await.map(|r| r.status()).map_err(|e| e.to_string())
}

#[tokio::test]
async fn non_connect_or_bad_authority_gets_400() {
    let s = setup(ClientConfig::default(), ServerConfig::default()).await;
    let get = h2_request(&s, || {
        http::Request::builder()
            .method("GET")
            .uri("https://10.0.0.1:80/")
            .body(())
            .unwrap()
    })
    .await;
    assert_eq!(get, Ok(http::StatusCode::BAD_REQUEST));
    let hostname = h2_request(&s, || {
        http::Request::builder()
            .method("CONNECT")
            .uri("example.com:80")
            .body(())
            .unwrap()
    })
    .await;
    assert_eq!(hostname, Ok(http::StatusCode::BAD_REQUEST));
    let no_port = h2_request(&s, || {
        http::Request::builder()
            .method("CONNECT")
            .uri("10.0.0.1")
            .body(())
            .unwrap()
    })
    .await;
    assert_eq!(no_port, Ok(http::StatusCode::BAD_REQUEST));
    // No authority at all: an origin-form target.

    let none = h2_request(&s, || {
        http::Request::builder()
            .method("CONNECT")
            .uri("/")
            .body(())
            .unwrap()
    })
    .await;
    // h2 itself rejects a CONNECT without :authority as malformed (RST_STREAM
    // PROTOCOL_ERROR) before our code sees it; either way the tunnel is refused.
    assert!(
        none == Ok(http::StatusCode::BAD_REQUEST)
            || none.as_ref().is_err_and(|e| e.contains("protocol error")),
        "missing authority must be refused: {none:?}"
    );
}

#[tokio::test]
async fn oversized_headers_refused() {
    let s = setup(ClientConfig::default(), ServerConfig::default()).await;
    let echo = start_echo().await;
    let mut req = s.request(echo);
    req.headers
        .insert(headers::BAGGAGE, "x".repeat(64 * 1024).parse().unwrap());
    let err = s.client.connect(req).await;
    assert!(err.is_err(), "a 64 KiB header must be refused");
    // The pool and server still work.
    let mut t = s
        .client
        .connect(s.request(echo))
        .await
        .expect("next tunnel");
    t.write_all(b"y").await.unwrap();
    let mut b = [0u8; 1];
    t.read_exact(&mut b).await.unwrap();
}

#[tokio::test]
async fn idle_connections_are_closed() {
    let client_config = ClientConfig {
        idle_timeout: Duration::from_millis(300),
        ..ClientConfig::default()
    };
    let s = setup(client_config, ServerConfig::default()).await;
    let echo = start_echo().await;
    let mut t = s.client.connect(s.request(echo)).await.unwrap();
    t.write_all(b"z").await.unwrap();
    let mut b = [0u8; 1];
    t.read_exact(&mut b).await.unwrap();
    assert_eq!(s.client.connection_count(), 1);
    // While a tunnel is open the connection stays, however long.
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(s.client.connection_count(), 1, "busy connection kept");
    drop(t);
    let client = s.client.clone();
    assert!(
        wait_until(Duration::from_secs(5), || client.connection_count() == 0).await,
        "idle connection dropped"
    );
}

#[tokio::test]
async fn client_gives_up_on_a_stalled_server() {
    init_tracing();
    let pki = TestPki::new(TRUST_DOMAIN);
    let client_id = pki.id("client-ns", "client-sa");
    // Accepts TCP and then never speaks TLS.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = silent.local_addr().unwrap();
    let _held = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            held.push(s);
        }
    });
    let client = HboneClient::new(
        ClientConfig {
            handshake_timeout: Duration::from_millis(300),
            ..ClientConfig::default()
        },
        Arc::new(StaticCerts::default().with(pki.cert(&client_id))),
    );
    let started = std::time::Instant::now();
    let err = client
        .connect(ConnectRequest {
            source: client_id,
            destination: pki.id("server-ns", "server-sa"),
            hbone_addr: addr,
            authority: HboneAuthority("127.0.0.1:80".parse().unwrap()),
            headers: http::HeaderMap::new(),
        })
        .await
        .unwrap_err();
    assert!(
        matches!(err, mesh::hbone::HboneError::HandshakeTimeout { .. }),
        "{err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "gave up promptly"
    );
    assert_eq!(
        client.connection_count(),
        0,
        "nothing half-open left in the pool"
    );
}

/// The zero-copy pump ztunnel uses between a socket and a tunnel: bytes intact both ways at
/// once, each side's half-close passed on, counts right.
#[tokio::test]
async fn tcp_tunnel_pump_keeps_bytes_half_close_and_counts() {
    const LEN: u64 = 64 << 20;
    let s = setup(ClientConfig::default(), ServerConfig::default()).await;
    let (target, mut results) = start_checksum_server(LEN, 7).await;
    // app <-> [socket pair] <-> pump <-> tunnel <-> HBONE server <-> checksum server
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app = TcpStream::connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    let (mut proxy_side, _) = listener.accept().await.unwrap();
    let tunnel = s.client.connect(s.request(target)).await.unwrap();
    let counts = Arc::new(mesh::copy::ByteCounts::default());
    let c = counts.clone();
    let pump = tokio::spawn(async move {
        mesh::hbone::stream::copy_tcp_and_tunnel(&mut proxy_side, tunnel, &c, mesh::copy::Side::A)
            .await
    });
    let (mut r, mut w) = app.into_split();
    let (sent, received) = tokio::join!(send_pattern(&mut w, LEN, 9), receive_hash(&mut r));
    let (got, got_hash, server_sent_hash) = results.recv().await.unwrap();
    assert_eq!(got, LEN);
    assert_eq!(got_hash, sent.unwrap(), "app -> server intact");
    let (n, hash) = received.unwrap();
    assert_eq!(n, LEN);
    assert_eq!(hash, server_sent_hash, "server -> app intact");
    pump.await
        .unwrap()
        .expect("pump ends cleanly after both half-closes");
    assert_eq!(counts.a_to_b(), LEN);
    assert_eq!(counts.b_to_a(), LEN);
}

/// A server that allows fewer concurrent streams than the client's own limit: once its
/// SETTINGS are known, the pool opens another connection instead of queueing tunnels.
#[tokio::test]
async fn pool_respects_the_servers_stream_limit() {
    let server = ServerConfig {
        max_concurrent_streams: 5,
        ..ServerConfig::default()
    };
    let s = setup(ClientConfig::default(), server).await;
    let echo = start_echo().await;
    let mut open = Vec::new();
    for i in 0..12u8 {
        let mut t = s.client.connect(s.request(echo)).await.expect("tunnel");
        t.write_all(&[i]).await.unwrap();
        let mut b = [0u8; 1];
        t.read_exact(&mut b).await.unwrap();
        assert_eq!(b[0], i);
        open.push(t);
    }
    assert_eq!(
        s.client.connection_count(),
        3,
        "12 concurrent tunnels at 5 per connection need 3 connections"
    );
}

/// `max_connections_per_peer`: a peer's connections past the cap are closed before their TLS
/// handshake, and a slot frees up when one of its connections closes.
#[tokio::test]
async fn connections_per_peer_are_capped() {
    let s = setup(
        ClientConfig::default(),
        ServerConfig {
            max_connections_per_peer: 2,
            ..ServerConfig::default()
        },
    )
    .await;
    let cert = s.pki.cert(&s.client_id);
    let handshake = || {
        let config = cert.client_config(vec![s.server_id.clone()]);
        let addr = s.hbone;
        async move {
            let tcp = TcpStream::connect(addr).await?;
            tokio_rustls::TlsConnector::from(config)
                .connect(mesh::tls::unused_server_name(), tcp)
                .await
        }
    };
    let first = handshake().await.expect("first connection");
    let _second = handshake().await.expect("second connection");
    assert!(
        handshake().await.is_err(),
        "a third connection from the same peer was served"
    );
    drop(first);
    // The server notices the close asynchronously.
    let mut reopened = None;
    for _ in 0..50 {
        if let Ok(c) = handshake().await {
            reopened = Some(c);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        reopened.is_some(),
        "the slot of a closed connection is not freed"
    );
}

/// `max_concurrent_streams` reaches the client as SETTINGS_MAX_CONCURRENT_STREAMS: with a cap
/// of 2, four concurrent tunnels need two connections.
#[tokio::test]
async fn streams_per_connection_are_capped() {
    let s = setup(
        ClientConfig::default(),
        ServerConfig {
            max_concurrent_streams: 2,
            ..ServerConfig::default()
        },
    )
    .await;
    let echo = start_echo().await;
    // The first tunnel teaches the pool the server's limit.
    let first = s.client.connect(s.request(echo)).await.unwrap();
    let mut tunnels = vec![first];
    for _ in 0..3 {
        tunnels.push(s.client.connect(s.request(echo)).await.unwrap());
    }
    for t in &mut tunnels {
        t.write_all(b"x").await.unwrap();
        let mut b = [0u8; 1];
        t.read_exact(&mut b).await.unwrap();
    }
    assert_eq!(s.client.connection_count(), 2, "2 streams per connection");
}
