//! The outbound tunnel the core reaches the box's kubelet API through (`kubectl logs`,
//! `exec`, `port-forward`): noded is an agent of the Konnectivity service
//! (`sigs.k8s.io/apiserver-network-proxy`).
//! Boxes sit behind NAT and the core never dials in, so noded dials the core's
//! konnectivity-server (`[apiserver] tunnel`) with the node's client certificate and
//! keeps one gRPC stream open (`AgentService/Connect`); kube-apiserver, whose egress
//! selector points at that server, asks for `<node>:10250` and the server sends the
//! dial down the stream to the agent that named itself with that host.
//!
//! On a dial noded answers with a connection of its own kubelet API (kubelet.rs) served
//! over an in-memory pipe: the tunnel reaches nothing else (no port is opened on the
//! box, and a dial to any other address is refused naming it). The stream is dialled
//! again with back-off whenever it ends; logged once, then at most every `LOG_EVERY`.
//!
//! The packets are the protocol's own (field numbers from its `client.proto`), written
//! here as prost messages.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_rustls::rustls;

use super::calls::{Limited, Retry};
use super::kubelet::Kubelet;
use edge_common::lock;

/// The kubelet API's port, as the Node's `daemonEndpoints` says; reached only through
/// the tunnel.
pub const KUBELET_PORT: u16 = 10250;
/// At most this many connections at once through the tunnel; a dial beyond is refused.
const MAX_CONNECTIONS: usize = 64;

#[derive(Clone, Copy, Debug, PartialEq, Eq, prost::Enumeration)]
#[repr(i32)]
enum PacketType {
    DialReq = 0,
    DialRsp = 1,
    CloseReq = 2,
    CloseRsp = 3,
    Data = 4,
    DialCls = 5,
    Drain = 6,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Packet {
    #[prost(enumeration = "PacketType", tag = "1")]
    r#type: i32,
    #[prost(oneof = "Payload", tags = "2, 3, 4, 5, 6, 7, 8")]
    payload: Option<Payload>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
enum Payload {
    #[prost(message, tag = "2")]
    DialRequest(DialRequest),
    #[prost(message, tag = "3")]
    DialResponse(DialResponse),
    #[prost(message, tag = "4")]
    Data(Data),
    #[prost(message, tag = "5")]
    CloseRequest(CloseRequest),
    #[prost(message, tag = "6")]
    CloseResponse(CloseResponse),
    #[prost(message, tag = "7")]
    CloseDial(CloseDial),
    #[prost(message, tag = "8")]
    Drain(Empty),
}

#[derive(Clone, PartialEq, prost::Message)]
struct DialRequest {
    #[prost(string, tag = "1")]
    protocol: String,
    #[prost(string, tag = "2")]
    address: String,
    #[prost(int64, tag = "3")]
    random: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
struct DialResponse {
    #[prost(string, tag = "1")]
    error: String,
    #[prost(int64, tag = "2")]
    connect_id: i64,
    #[prost(int64, tag = "3")]
    random: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
struct CloseRequest {
    #[prost(int64, tag = "1")]
    connect_id: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
struct CloseResponse {
    #[prost(string, tag = "1")]
    error: String,
    #[prost(int64, tag = "2")]
    connect_id: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
struct CloseDial {
    #[prost(int64, tag = "1")]
    random: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Empty {}

#[derive(Clone, PartialEq, prost::Message)]
struct Data {
    #[prost(int64, tag = "1")]
    connect_id: i64,
    #[prost(string, tag = "2")]
    error: String,
    #[prost(bytes = "vec", tag = "3")]
    data: Vec<u8>,
}

fn packet(t: PacketType, payload: Payload) -> Packet {
    Packet {
        r#type: t as i32,
        payload: Some(payload),
    }
}

fn close_rsp(connect_id: i64, error: &str) -> Packet {
    packet(
        PacketType::CloseRsp,
        Payload::CloseResponse(CloseResponse {
            error: error.into(),
            connect_id,
        }),
    )
}

/// The tunnel's end at the core and how noded is known there.
pub(super) struct Tunnel {
    /// `host:port` of konnectivity-server's agent port.
    pub address: String,
    /// The node's name: the one host a dial may name (node.rs reports no other address
    /// for a tunnelled node, so that the API server dials by name).
    pub node_name: String,
    /// The node's client certificate, trusting the kubeconfig's CA.
    pub tls: Arc<rustls::ClientConfig>,
}

impl Tunnel {
    /// How the server's `destHost` strategy finds this agent: by the node's name only.
    /// Boxes behind NAT can share a site address, and an agent known by it could be
    /// sent another box's dials.
    fn identifiers(&self) -> String {
        format!("host={}", self.node_name)
    }

    /// Whether a dial names this node's kubelet API.
    fn ours(&self, address: &str) -> bool {
        let Some((host, port)) = address.rsplit_once(':') else {
            return false;
        };
        port == KUBELET_PORT.to_string() && host == self.node_name
    }
}

/// Keeps the tunnel up for as long as the task lives.
pub(super) async fn run(tunnel: Tunnel, kubelet: Arc<Kubelet>, retry_max: std::time::Duration) {
    let tunnel = Arc::new(tunnel);
    let mut limited = Limited::new("the tunnel to konnectivity-server");
    let mut retry = Retry::new(retry_max);
    loop {
        match session(&tunnel, &kubelet, &mut limited).await {
            Ok(()) => {
                tracing::info!(server = %tunnel.address, "the tunnel was closed by the server");
                retry.reset();
            }
            Err(e) => limited.fail(&format!("{} ({e})", tunnel.address)),
        }
        tokio::time::sleep(retry.next_delay()).await;
    }
}

type Conns = Arc<Mutex<HashMap<i64, mpsc::Sender<Vec<u8>>>>>;

/// One stream: dials, then serves the server's packets until the stream ends.
async fn session(
    tunnel: &Arc<Tunnel>,
    kubelet: &Arc<Kubelet>,
    limited: &mut Limited,
) -> Result<(), String> {
    let channel = tonic::transport::Endpoint::from_static("http://konnectivity")
        .connect_timeout(super::CALL_TIMEOUT)
        .connect_with_connector(connector(tunnel.clone()))
        .await
        .map_err(|e| format!("failed to connect: {}", edge_csi::unix::error_chain(&e)))?;
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| format!("not ready: {}", edge_csi::unix::error_chain(&e)))?;
    let (tx, rx) = mpsc::channel::<Packet>(64);
    let outbound =
        futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|p| (p, rx)) });
    let mut req = tonic::Request::new(outbound);
    let meta = |v: &str| {
        tonic::metadata::MetadataValue::try_from(v).map_err(|e| format!("bad metadata: {e}"))
    };
    req.metadata_mut()
        .insert("agentid", meta(&tunnel.node_name)?);
    req.metadata_mut()
        .insert("agentidentifiers", meta(&tunnel.identifiers())?);
    let path = tonic::codegen::http::uri::PathAndQuery::from_static("/AgentService/Connect");
    let mut inbound = grpc
        .streaming(
            req,
            path,
            tonic::codec::ProstCodec::<Packet, Packet>::default(),
        )
        .await
        .map_err(|s| format!("refused: {} ({:?})", s.message(), s.code()))?
        .into_inner();
    limited.ok();
    tracing::info!(server = %tunnel.address, identifiers = %tunnel.identifiers(), "tunnel to konnectivity-server up");
    let conns: Conns = Arc::default();
    let mut next_id: i64 = 0;
    loop {
        let p = match inbound.message().await {
            Ok(Some(p)) => p,
            Ok(None) => return Ok(()),
            Err(s) => return Err(format!("stream failed: {} ({:?})", s.message(), s.code())),
        };
        match p.payload {
            Some(Payload::DialRequest(d)) => {
                if d.protocol != "tcp" || !tunnel.ours(&d.address) {
                    tracing::warn!(address = %d.address, protocol = %d.protocol, "tunnel: dial refused");
                    let error = format!(
                        "noded's tunnel reaches only this node's kubelet API ({}:{KUBELET_PORT} over tcp), not {} {}",
                        tunnel.node_name, d.protocol, d.address
                    );
                    let rsp = DialResponse {
                        error,
                        connect_id: 0,
                        random: d.random,
                    };
                    send(&tx, packet(PacketType::DialRsp, Payload::DialResponse(rsp))).await?;
                    continue;
                }
                if lock(&conns).len() >= MAX_CONNECTIONS {
                    tracing::warn!(address = %d.address, "tunnel: dial refused: {MAX_CONNECTIONS} connections open");
                    let rsp = DialResponse {
                        error: format!(
                            "noded has {MAX_CONNECTIONS} connections open, the most it takes"
                        ),
                        connect_id: 0,
                        random: d.random,
                    };
                    send(&tx, packet(PacketType::DialRsp, Payload::DialResponse(rsp))).await?;
                    continue;
                }
                next_id += 1;
                let id = next_id;
                open(id, kubelet.clone(), tx.clone(), conns.clone());
                let rsp = DialResponse {
                    error: String::new(),
                    connect_id: id,
                    random: d.random,
                };
                send(&tx, packet(PacketType::DialRsp, Payload::DialResponse(rsp))).await?;
            }
            Some(Payload::Data(d)) => {
                let sender = lock(&conns).get(&d.connect_id).cloned();
                match sender {
                    // A full pipe holds the stream back rather than drop bytes.
                    Some(s) => {
                        let _ = s.send(d.data).await;
                    }
                    None => send(&tx, close_rsp(d.connect_id, "unknown connectID")).await?,
                }
            }
            Some(Payload::CloseRequest(c)) => {
                // Dropping the sender ends the pipe's input; the connection's reader
                // then sees it end and answers CLOSE_RSP.
                if lock(&conns).remove(&c.connect_id).is_none() {
                    send(&tx, close_rsp(c.connect_id, "unknown connectID")).await?;
                }
            }
            // A dial the server gave up on: ours are answered at once.
            Some(Payload::CloseDial(_)) => {}
            other => tracing::debug!(packet = ?other, "tunnel: packet ignored"),
        }
    }
}

async fn send(tx: &mpsc::Sender<Packet>, p: Packet) -> Result<(), String> {
    tx.send(p)
        .await
        .map_err(|_| "the stream's sender is gone".to_string())
}

/// A connection of the kubelet API over an in-memory pipe: DATA in is written to it,
/// what it writes goes out as DATA, and its end is told with CLOSE_RSP.
fn open(id: i64, kubelet: Arc<Kubelet>, tx: mpsc::Sender<Packet>, conns: Conns) {
    let (ours, theirs) = tokio::io::duplex(64 * 1024);
    tokio::spawn(kubelet.serve(theirs));
    let (mut rd, mut wr) = tokio::io::split(ours);
    let (in_tx, mut in_rx) = mpsc::channel::<Vec<u8>>(16);
    lock(&conns).insert(id, in_tx);
    tokio::spawn(async move {
        while let Some(b) = in_rx.recv().await {
            if wr.write_all(&b).await.is_err() {
                break;
            }
        }
        let _ = wr.shutdown().await;
    });
    tokio::spawn(async move {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let data = Data {
                        connect_id: id,
                        error: String::new(),
                        data: buf[..n].to_vec(),
                    };
                    if tx
                        .send(packet(PacketType::Data, Payload::Data(data)))
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
            }
        }
        lock(&conns).remove(&id);
        let _ = tx.send(close_rsp(id, "")).await;
    });
}

/// TCP to the server's agent port, then TLS with the node's certificate (h2 by ALPN).
fn connector(
    tunnel: Arc<Tunnel>,
) -> impl tower::Service<
    tonic::codegen::http::Uri,
    Response = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>,
    Error = std::io::Error,
    Future = impl Send,
> + Clone
       + Send
       + 'static {
    tower::service_fn(move |_| {
        let tunnel = tunnel.clone();
        async move {
            let tcp = tokio::net::TcpStream::connect(&tunnel.address).await?;
            let host = tunnel
                .address
                .rsplit_once(':')
                .map_or(tunnel.address.as_str(), |(h, _)| h)
                .trim_matches(['[', ']']);
            let name = rustls::pki_types::ServerName::try_from(host.to_string())
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
            let tls = tokio_rustls::TlsConnector::from(tunnel.tls.clone())
                .connect(name, tcp)
                .await?;
            Ok(hyper_util::rt::TokioIo::new(tls))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn a_dial_request_decodes_as_the_protocol_lays_it_out() {
        // type DIAL_REQ (0, left out), dialRequest (field 2) = {protocol "tcp",
        // address "edge-a:10250", random 7}.
        let inner = [
            &[0x0a, 3][..],
            b"tcp",
            &[0x12, 12],
            b"edge-a:10250",
            &[0x18, 7],
        ]
        .concat();
        let bytes = [&[0x12, inner.len() as u8][..], &inner].concat();
        let p = Packet::decode(bytes.as_slice()).unwrap();
        assert_eq!(p.r#type, PacketType::DialReq as i32);
        assert_eq!(
            p.payload,
            Some(Payload::DialRequest(DialRequest {
                protocol: "tcp".into(),
                address: "edge-a:10250".into(),
                random: 7
            }))
        );
        // DATA: type 4, data (field 4) = {connectID 3, data "hi"}.
        let out = packet(
            PacketType::Data,
            Payload::Data(Data {
                connect_id: 3,
                error: String::new(),
                data: b"hi".to_vec(),
            }),
        )
        .encode_to_vec();
        assert_eq!(out, [0x08, 4, 0x22, 6, 0x08, 3, 0x1a, 2, b'h', b'i']);
    }

    #[test]
    fn only_this_nodes_kubelet_port_is_reachable() {
        let roots = rustls::RootCertStore::empty();
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        let t = Tunnel {
            address: "core:8132".into(),
            node_name: "edge-a".into(),
            tls: Arc::new(tls),
        };
        assert_eq!(t.identifiers(), "host=edge-a");
        assert!(t.ours("edge-a:10250"));
        // By address a dial could be another box's behind the same kind of NAT.
        assert!(!t.ours("10.0.2.15:10250"));
        assert!(!t.ours("edge-a:22"));
        assert!(!t.ours("edge-b:10250"));
        assert!(!t.ours("10.0.2.16:10250"));
        assert!(!t.ours("edge-a"));
    }
}
