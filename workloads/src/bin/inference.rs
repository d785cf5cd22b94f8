//! `inference`: the bundled model server. It loads a model file from a volume
//! (`MODEL_PATH`), answers `POST /infer` with the model's score for the JSON features
//! in the body, and reloads the file when it changes, so a model the core delivers
//! takes effect without a restart. A model that does not parse is reported by file and
//! line; the one loaded before keeps serving.
//!
//! The model is a logistic regression in a small text format (docs/node.md):
//!
//! ```text
//! model temp-anomaly        # its name, reported with every answer
//! bias -45
//! weight celsius 2.0        # one line per feature
//! threshold 0.5             # score >= threshold is an anomaly
//! ```
//!
//! `GET /healthz` is 200 once a model is loaded and 503 before (a readiness probe).

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};
use workloads::{parse_flat_object, read_request, respond, Value};

/// Connections served at once; more wait in the listen backlog.
const MAX_CONNECTIONS: usize = 32;

#[derive(Debug, Clone, PartialEq)]
struct Model {
    name: String,
    bias: f64,
    weights: Vec<(String, f64)>,
    threshold: f64,
}

fn parse_model(text: &str, path: &Path) -> Result<Model, String> {
    let at = |n: usize, msg: String| format!("{} line {}: {msg}", path.display(), n + 1);
    let num = |n: usize, v: Option<&str>, what: &str| {
        v.and_then(|v| v.parse::<f64>().ok())
            .filter(|v| v.is_finite())
            .ok_or_else(|| at(n, format!("{what} needs a number")))
    };
    let (mut name, mut bias, mut threshold) = (None, 0.0, 0.5);
    let mut weights: Vec<(String, f64)> = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        let mut f = line.split_whitespace();
        let Some(word) = f.next() else { continue };
        match word {
            "model" => name = Some(f.next().ok_or_else(|| at(n, "model needs a name".into()))?),
            "bias" => bias = num(n, f.next(), "bias")?,
            "threshold" => threshold = num(n, f.next(), "threshold")?,
            "weight" => {
                let feature = f
                    .next()
                    .ok_or_else(|| at(n, "weight needs a feature and a number".into()))?;
                if weights.iter().any(|(w, _)| w == feature) {
                    return Err(at(n, format!("feature `{feature}` is weighted twice")));
                }
                weights.push((feature.to_owned(), num(n, f.next(), "weight")?));
            }
            other => return Err(at(n, format!("unknown keyword `{other}`"))),
        }
        if let Some(extra) = f.next() {
            return Err(at(n, format!("unexpected `{extra}`")));
        }
    }
    let name = name.ok_or_else(|| format!("{}: no `model <name>` line", path.display()))?;
    if weights.is_empty() {
        return Err(format!("{}: no `weight` line", path.display()));
    }
    Ok(Model {
        name: name.to_owned(),
        bias,
        weights,
        threshold,
    })
}

/// The score of `features`, or the name of the first feature the model needs and the
/// request lacks.
fn score(m: &Model, features: &[(String, Value)]) -> Result<f64, String> {
    let mut z = m.bias;
    for (name, w) in &m.weights {
        match features.iter().find(|(k, _)| k == name) {
            Some((_, Value::Number(x))) => z += w * x,
            Some(_) => return Err(format!("feature `{name}` is not a number")),
            None => return Err(format!("feature `{name}` is missing")),
        }
    }
    Ok(1.0 / (1.0 + (-z).exp()))
}

fn answer(m: &Model, body: &[u8]) -> (u16, String) {
    let features = match std::str::from_utf8(body)
        .map_err(|_| "the body is not UTF-8".to_owned())
        .and_then(parse_flat_object)
    {
        Ok(f) => f,
        Err(e) => return (400, format!("{{\"error\":\"{}\"}}", e.replace('"', "'"))),
    };
    match score(m, &features) {
        Ok(s) => (
            200,
            format!(
                r#"{{"model":"{}","score":{s:.4},"anomaly":{}}}"#,
                m.name,
                s >= m.threshold
            ),
        ),
        Err(e) => (400, format!("{{\"error\":\"{}\"}}", e.replace('"', "'"))),
    }
}

type Shared = Arc<RwLock<Option<Model>>>;

fn serve(stream: TcpStream, model: &Shared) {
    stream.set_read_timeout(Some(Duration::from_secs(10))).ok();
    let req = match read_request(&stream) {
        Ok(r) => r,
        Err(e) => return respond(&stream, 400, "text/plain", &format!("{e}\n")),
    };
    let current = model.read().unwrap_or_else(|p| p.into_inner()).clone();
    match (req.method.as_str(), req.path.as_str(), current) {
        ("GET", "/healthz", Some(m)) => {
            respond(&stream, 200, "text/plain", &format!("ok {}\n", m.name))
        }
        ("GET", "/healthz", None) => respond(&stream, 503, "text/plain", "no model loaded\n"),
        ("POST", "/infer", Some(m)) => {
            let (status, body) = answer(&m, &req.body);
            respond(&stream, status, "application/json", &body)
        }
        ("POST", "/infer", None) => respond(
            &stream,
            503,
            "application/json",
            r#"{"error":"no model loaded"}"#,
        ),
        (_, "/healthz" | "/infer", _) => {
            respond(&stream, 405, "text/plain", "method not allowed\n")
        }
        _ => respond(&stream, 404, "text/plain", "not found\n"),
    }
}

/// Loads the model whenever the file's modification time changes.
fn watch(path: PathBuf, model: Shared) {
    let mut seen: Option<SystemTime> = None;
    let mut waiting_said = false;
    loop {
        match std::fs::metadata(&path).and_then(|m| m.modified()) {
            Ok(t) if Some(t) != seen => {
                seen = Some(t);
                match std::fs::read_to_string(&path)
                    .map_err(|e| format!("cannot read {}: {e}", path.display()))
                    .and_then(|text| parse_model(&text, &path))
                {
                    Ok(m) => {
                        eprintln!(
                            "inference: model `{}` loaded from {} ({} features)",
                            m.name,
                            path.display(),
                            m.weights.len()
                        );
                        *model.write().unwrap_or_else(|p| p.into_inner()) = Some(m);
                    }
                    Err(e) => eprintln!("inference: {e}; keeping the model loaded before"),
                }
            }
            Ok(_) => {}
            Err(e) if !waiting_said => {
                eprintln!(
                    "inference: waiting for the model at {}: {e}",
                    path.display()
                );
                waiting_said = true;
            }
            Err(_) => {}
        }
        std::thread::sleep(Duration::from_secs(2));
    }
}

fn main() {
    let path =
        PathBuf::from(std::env::var("MODEL_PATH").unwrap_or_else(|_| "/models/model.txt".into()));
    let listen = std::env::var("LISTEN").unwrap_or_else(|_| "0.0.0.0:8080".into());
    let listener = match TcpListener::bind(&listen) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("inference: cannot listen on {listen}: {e}");
            std::process::exit(1);
        }
    };
    eprintln!("inference: listening on {listen}");
    let model: Shared = Arc::new(RwLock::new(None));
    let m = model.clone();
    std::thread::spawn(move || watch(path, m));
    let busy = Arc::new(AtomicUsize::new(0));
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        while busy.load(Ordering::Acquire) >= MAX_CONNECTIONS {
            std::thread::sleep(Duration::from_millis(5));
        }
        busy.fetch_add(1, Ordering::AcqRel);
        let (model, busy) = (model.clone(), busy.clone());
        std::thread::spawn(move || {
            serve(stream, &model);
            busy.fetch_sub(1, Ordering::AcqRel);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MODEL: &str = "# demo\nmodel temp-anomaly\nbias -45\nweight celsius 2.0\nthreshold 0.5\n";

    #[test]
    fn the_model_file_parses_and_mistakes_name_their_line() {
        let m = parse_model(MODEL, Path::new("/models/m.txt")).unwrap();
        assert_eq!(m.name, "temp-anomaly");
        assert_eq!(m.weights, vec![("celsius".to_owned(), 2.0)]);
        let bad = |t: &str| parse_model(t, Path::new("/m")).unwrap_err();
        assert_eq!(
            bad("model a\nweight x\n"),
            "/m line 2: weight needs a number"
        );
        assert_eq!(
            bad("model a\nbias 1 2\nweight x 1\n"),
            "/m line 2: unexpected `2`"
        );
        assert_eq!(
            bad("model a\nlayers 3\n"),
            "/m line 2: unknown keyword `layers`"
        );
        assert_eq!(bad("weight x 1\n"), "/m: no `model <name>` line");
        assert_eq!(bad("model a\n"), "/m: no `weight` line");
        assert!(bad("model a\nweight x 1\nweight x 2\n").contains("weighted twice"));
        assert!(bad("model a\nweight x inf\n").contains("needs a number"));
    }

    #[test]
    fn answers_score_the_features_and_name_what_is_missing() {
        let m = parse_model(MODEL, Path::new("/m")).unwrap();
        let (status, body) = answer(&m, br#"{"sensor":"temp0","celsius":22.5}"#);
        assert_eq!(
            (status, body.as_str()),
            (
                200,
                r#"{"model":"temp-anomaly","score":0.5000,"anomaly":true}"#
            )
        );
        let (_, body) = answer(&m, br#"{"celsius":20}"#);
        assert!(body.contains(r#""anomaly":false"#), "{body}");
        assert_eq!(
            answer(&m, br#"{"kelvin":300}"#).1,
            r#"{"error":"feature `celsius` is missing"}"#
        );
        assert_eq!(
            answer(&m, br#"{"celsius":"hot"}"#).1,
            r#"{"error":"feature `celsius` is not a number"}"#
        );
        assert_eq!(answer(&m, b"not json").0, 400);
    }

    #[test]
    fn the_server_answers_over_http() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let model: Shared = Arc::new(RwLock::new(None));
        let m = model.clone();
        std::thread::spawn(move || {
            for s in listener.incoming() {
                serve(s.unwrap(), &m);
            }
        });
        let (status, _) = workloads::post(&addr, "/infer", r#"{"celsius":30}"#).unwrap();
        assert_eq!(status, 503, "no model yet");
        *model.write().unwrap() = Some(parse_model(MODEL, Path::new("/m")).unwrap());
        let (status, body) = workloads::post(&addr, "/infer", r#"{"celsius":30}"#).unwrap();
        assert_eq!(status, 200);
        assert!(body.contains(r#""anomaly":true"#), "{body}");
        assert_eq!(workloads::post(&addr, "/nope", "{}").unwrap().0, 404);
    }
}
