//! The DNS proxy's handling of what a pod sends to 15053, and of what the upstream answers:
//! `PodDns::handle`, the function both the UDP and the TCP listener call with the received
//! bytes, against a state with mesh services (so mesh names are answered), a cache, and a fake
//! upstream on loopback that answers with bytes of the input.
//!
//! Input, repeated up to 4 times: a flags byte, a big-endian u16 length and the query, a u16
//! length and the upstream's answer. Flags: bit 0 TCP (else UDP); bit 1 the upstream answers
//! (else it stays silent until the deadline); bit 2 the answer's id is set to the forwarded
//! query's (so it is accepted as the reply); bits 3-7 seconds to let pass first (cache expiry).
//! Time is tokio's paused clock, so deadlines cost nothing. Beyond not panicking: a reply is a
//! DNS message with the query's id, a UDP reply fits the client's buffer, a TCP one fits the
//! two-byte length prefix.
#![no_main]

use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use mesh::discovery::{Store, StoreWriter};
use mesh::model::translate::{Kind, Object, ObjectKey, TranslateConfig, Translator};
use prometheus_client::registry::Registry;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};
use ztunnel::dns::cache::Clock;
use ztunnel::dns::metrics::DnsMetrics;
use ztunnel::dns::proto::op::Message;
use ztunnel::dns::{DnsConfig, DnsProxy, Protocol};
use ztunnel::pods::HostNetwork;

/// The cache reads tokio's clock, so `tokio::time::advance` expires entries.
#[derive(Debug)]
struct TokioClock;

impl Clock for TokioClock {
    fn now(&self) -> Instant {
        tokio::time::Instant::now().into_std()
    }
}

/// What the fake upstream answers next: the bytes, and whether to give them the query's id.
type NextAnswer = Arc<Mutex<Option<(Vec<u8>, bool)>>>;

struct World {
    runtime: tokio::runtime::Runtime,
    proxy: Arc<DnsProxy>,
    answer: NextAnswer,
}

fn answer_for(query: &[u8], answer: &NextAnswer) -> Option<Vec<u8>> {
    let (mut bytes, patch_id) = answer.lock().expect("not poisoned").clone()?;
    if patch_id && bytes.len() >= 2 && query.len() >= 2 {
        bytes[..2].copy_from_slice(&query[..2]);
    }
    Some(bytes)
}

async fn serve_udp(socket: UdpSocket, answer: NextAnswer) {
    let mut buf = vec![0u8; 65535];
    loop {
        let Ok((len, peer)) = socket.recv_from(&mut buf).await else {
            continue;
        };
        if let Some(reply) = answer_for(&buf[..len], &answer) {
            let _ = socket.send_to(&reply, peer).await;
        }
    }
}

async fn serve_tcp(listener: TcpListener, answer: NextAnswer) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        let answer = answer.clone();
        tokio::spawn(async move {
            let Ok(len) = stream.read_u16().await else {
                return;
            };
            let mut query = vec![0u8; usize::from(len)];
            if stream.read_exact(&mut query).await.is_err() {
                return;
            }
            if let Some(reply) = answer_for(&query, &answer) {
                let len = u16::try_from(reply.len()).unwrap_or(u16::MAX);
                let mut framed = len.to_be_bytes().to_vec();
                framed.extend_from_slice(&reply[..usize::from(len)]);
                let _ = stream.write_all(&framed).await;
                // The client closes first: its side keeps the TIME_WAIT, which Linux reuses on
                // loopback, so millions of runs do not exhaust ports.
                let mut rest = Vec::new();
                let _ = stream.read_to_end(&mut rest).await;
            }
            // A silent upstream holds the connection until the client gives up.
            let mut rest = Vec::new();
            let _ = stream.read_to_end(&mut rest).await;
        });
    }
}

fn mesh_state() -> mesh::model::State {
    let objects = [
        json!({ "apiVersion": "v1", "kind": "Namespace",
                "metadata": { "name": "demo", "labels": { "istio.io/dataplane-mode": "ambient" } } }),
        json!({ "apiVersion": "v1", "kind": "Pod",
                "metadata": { "name": "client", "namespace": "demo", "labels": { "app": "client" } },
                "spec": { "nodeName": "node-a" },
                "status": { "phase": "Running", "podIP": "10.1.0.9" } }),
        json!({ "apiVersion": "v1", "kind": "Service",
                "metadata": { "name": "reviews", "namespace": "demo" },
                "spec": { "clusterIP": "10.96.0.5", "clusterIPs": ["10.96.0.5", "fd00::5"],
                          "ports": [{ "name": "http", "port": 9080 }] } }),
        json!({ "apiVersion": "v1", "kind": "Service",
                "metadata": { "name": "db", "namespace": "demo" },
                "spec": { "clusterIP": "None", "ports": [{ "name": "tcp", "port": 5432 }] } }),
        json!({ "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": { "name": "db-1", "namespace": "demo",
                              "labels": { "kubernetes.io/service-name": "db" } },
                "addressType": "IPv4",
                "endpoints": [ { "addresses": ["10.1.0.20"], "conditions": { "ready": true } },
                               { "addresses": ["10.1.0.21"], "conditions": { "ready": true } } ],
                "ports": [{ "name": "tcp", "port": 5432 }] }),
    ];
    let objects = objects.into_iter().map(|value| {
        let kind = match value["kind"].as_str() {
            Some("Namespace") => Kind::Namespace,
            Some("Pod") => Kind::Pod,
            Some("Service") => Kind::Service,
            _ => Kind::EndpointSlice,
        };
        let namespace = value["metadata"]["namespace"].as_str().map(str::to_owned);
        let name = value["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let key = ObjectKey::new(kind, namespace.as_deref(), &name);
        Object::from_value(&key, value)
    });
    let translation = Translator::new(TranslateConfig::default()).translate(objects);
    assert!(
        translation.rejections.is_empty(),
        "{:?}",
        translation.rejections
    );
    translation.state
}

fn world() -> &'static World {
    static WORLD: OnceLock<World> = OnceLock::new();
    WORLD.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .expect("a runtime");
        let answer: NextAnswer = Arc::default();
        let upstream = runtime.block_on(async {
            // UDP and TCP on one port, as a resolver listens.
            loop {
                let listener = TcpListener::bind("127.0.0.1:0").await.expect("a TCP port");
                let addr = listener.local_addr().expect("bound");
                if let Ok(socket) = UdpSocket::bind(addr).await {
                    tokio::spawn(serve_udp(socket, answer.clone()));
                    tokio::spawn(serve_tcp(listener, answer.clone()));
                    break addr;
                }
            }
        });
        let writer = StoreWriter::new();
        writer.apply(mesh_state());
        let store: Store = writer.store();
        // The writer is kept alive with the store for the whole run.
        std::mem::forget(writer);
        let config = DnsConfig::new("cluster.local".into(), vec![upstream]);
        let proxy = Arc::new(DnsProxy::with_clock(
            config,
            store,
            DnsMetrics::new(&mut Registry::default()),
            Arc::new(TokioClock),
        ));
        World {
            runtime,
            proxy,
            answer,
        }
    })
}

/// Takes a u16-length-prefixed chunk.
fn chunk<'a>(data: &mut &'a [u8]) -> Option<&'a [u8]> {
    let (len, rest) = data.split_first_chunk::<2>()?;
    let len = usize::from(u16::from_be_bytes(*len)).min(rest.len());
    let (chunk, rest) = rest.split_at(len);
    *data = rest;
    Some(chunk)
}

fn check_reply(query: &[u8], reply: &[u8], protocol: Protocol) {
    let message = Message::from_vec(reply)
        .unwrap_or_else(|e| panic!("the proxy answered bytes that are not DNS: {e}"));
    assert_eq!(
        Some(&reply[..2]),
        query.get(..2),
        "the reply does not carry the query's id"
    );
    match protocol {
        Protocol::Tcp => assert!(reply.len() <= usize::from(u16::MAX)),
        Protocol::Udp => {
            // The client's EDNS buffer, at least 512, as the proxy reads it.
            let limit = Message::from_vec(query)
                .map(|q| usize::from(q.max_payload()))
                .unwrap_or(512);
            assert!(
                reply.len() <= limit.max(512),
                "{} bytes over UDP to a client taking {limit}",
                reply.len()
            );
        }
    }
    drop(message);
}

fuzz_target!(|data: &[u8]| {
    let world = world();
    let pod = world
        .proxy
        .for_pod("demo/client", "demo", Arc::new(HostNetwork::default()));
    let mut data = data;
    for _ in 0..4 {
        let Some((&flags, rest)) = data.split_first() else {
            break;
        };
        data = rest;
        let Some(query) = chunk(&mut data) else {
            break;
        };
        let answer = chunk(&mut data).unwrap_or_default();
        let protocol = if flags & 1 == 1 {
            Protocol::Tcp
        } else {
            Protocol::Udp
        };
        *world.answer.lock().expect("not poisoned") =
            (flags & 2 == 2).then(|| (answer.to_vec(), flags & 4 == 4));
        let wait = Duration::from_secs(u64::from(flags >> 3) * 10);
        let reply = world.runtime.block_on(async {
            tokio::time::advance(wait).await;
            pod.handle(query, protocol).await
        });
        if let Some(reply) = reply {
            check_reply(query, &reply, protocol);
        }
    }
});
