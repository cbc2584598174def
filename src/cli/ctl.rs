//! `cryptnbd ctl`: talks to a running `serve` through its control socket (see
//! `cryptnbd::control` for the protocol): `status`, `detach`, `attach`, `reload`, `snapshot`
//! (online, of an attached export), and `top`, a
//! view of every export's throughput, IOPS and latency refreshed each second.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};
use serde_json::Value;

use cryptnbd::control::{client, Request};
use cryptnbd::datadir::{split_layer_name, DataDirError};

use super::{print_json, Global};

#[derive(Args, Debug)]
pub struct CtlArgs {
    /// The server's control socket. Default: `ctl.sock` in the data directory.
    #[arg(long, global = true, value_name = "PATH")]
    ctl: Option<PathBuf>,

    /// Print the server's answer as JSON.
    #[arg(long, global = true)]
    json: bool,

    #[command(subcommand)]
    command: CtlCommand,
}

#[derive(Subcommand, Debug)]
enum CtlCommand {
    /// Exports (volume, key, attached or detached, counters) and connections (peer, bytes,
    /// requests, uptime).
    Status,
    /// Stop serving EXPORT: new connections are refused, requests in flight finish, its clients
    /// are closed, the volume is flushed and closed and its data key dropped from memory.
    Detach { export: String },
    /// Attach EXPORT now: a volume created after `serve` started, or one detached.
    Attach { export: String },
    /// Reload the TLS certificate, key and client CA (as SIGHUP does).
    Reload,
    /// Take snapshot NAME@SNAP of export NAME; online if it is attached: writes in flight
    /// finish, new ones wait while the snapshot is switched in (no data is copied).
    Snapshot {
        #[arg(value_name = "NAME@SNAP")]
        target: String,
    },
    /// Every export's read/write throughput, IOPS and mean latency, refreshed each interval.
    Top {
        /// Seconds between refreshes.
        #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
        interval: Duration,
        /// Stop after this many refreshes and print plain lines (no screen clearing).
        #[arg(long, value_name = "N")]
        iterations: Option<u64>,
    },
}

pub fn run(global: &Global, args: CtlArgs) -> anyhow::Result<()> {
    let path = args
        .ctl
        .clone()
        .unwrap_or_else(|| super::serve_ops::default_ctl_path(&global.data_dir));
    let call = |req: Request| client::call(&path, &req);
    let (req, human): (Request, fn(&Value)) = match args.command {
        CtlCommand::Top {
            interval,
            iterations,
        } => return top(&path, interval, iterations, args.json),
        CtlCommand::Status => (Request::Status, print_status),
        CtlCommand::Detach { export } => (Request::Detach { export }, print_detach),
        CtlCommand::Attach { export } => (Request::Attach { export }, print_attach),
        CtlCommand::Snapshot { target } => (snapshot_request(&target)?, print_snapshot),
        CtlCommand::Reload => (Request::Reload, |v| {
            println!("{}", v["reloaded"].as_str().unwrap_or("reloaded"))
        }),
    };
    let v = call(req)?;
    if args.json {
        print_json(&v)
    } else {
        human(&v);
        Ok(())
    }
}

fn snapshot_request(target: &str) -> anyhow::Result<Request> {
    match split_layer_name(target)? {
        (export, Some(snapshot)) => Ok(Request::Snapshot {
            export: export.into(),
            snapshot: snapshot.into(),
        }),
        _ => anyhow::bail!("name the snapshot as NAME@SNAP"),
    }
}

fn print_snapshot(v: &Value) {
    let target = v["snapshot"].as_str().unwrap_or("?");
    match v["writes_held_ms"].as_f64() {
        Some(ms) => println!(
            "took snapshot {target} online (writes held {ms:.1} ms); serve it read-only as export {target}, or clone it with `cryptnbd volume clone {target} NEW`"
        ),
        None => println!("took snapshot {target} (the volume was not attached)"),
    }
}

/// `volume snapshot NAME@SNAP` of a volume something has attached (`refused`): the server on
/// this data directory's control socket takes it online if it is the holder; else `refused`,
/// which says what to do.
pub fn snapshot_via_server(
    global: &Global,
    target: &str,
    refused: DataDirError,
) -> anyhow::Result<()> {
    let path = super::serve_ops::default_ctl_path(&global.data_dir);
    match client::call(&path, &snapshot_request(target)?) {
        Ok(v) => {
            print_snapshot(&v);
            Ok(())
        }
        // No server there: whoever holds the volume is another command or another server.
        Err(client::CallError::Connect { .. }) => Err(refused.into()),
        Err(e) => Err(anyhow::Error::from(e).context(format!(
            "the server on {} could not take snapshot {target}",
            path.display()
        ))),
    }
}

/// A volume command refused because the volume is in use: when the server on this data
/// directory's control socket holds it, say which (pid, socket) and how to detach it.
pub fn explain_in_use(global: &Global, name: &str, e: DataDirError) -> anyhow::Error {
    if !matches!(e, DataDirError::InUse { .. }) {
        return e.into();
    }
    let path = super::serve_ops::default_ctl_path(&global.data_dir);
    let held =
        client::call(&path, &Request::Status).ok().filter(|v| {
            v["exports"].as_array().into_iter().flatten().any(|x| {
                x["name"].as_str() == Some(name) && x["state"].as_str() == Some("attached")
            })
        });
    match held {
        Some(v) => anyhow::Error::from(e).context(format!(
            "volume {name:?} is attached by the cryptnbd server with pid {} (control socket {}): \
             detach it with `cryptnbd --data-dir {} ctl detach {name}` (its clients are \
             disconnected), then run this again",
            v["pid"],
            path.display(),
            global.data_dir.display()
        )),
        None => anyhow::Error::from(e).context(format!(
            "volume {name:?} is in use and no server answers on {} holding it: another command, \
             or a server with its control socket elsewhere (`cryptnbd ctl --ctl PATH status`)",
            path.display()
        )),
    }
}

fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut f = n as f64;
    let mut u = 0;
    while f >= 1024.0 && u < UNITS.len() - 1 {
        f /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{f:.1} {}", UNITS[u])
    }
}

fn print_status(v: &Value) {
    println!(
        "server pid {}, up {:.0}s, buffer budget {} of {} in use",
        v["pid"],
        v["uptime_s"].as_f64().unwrap_or(0.0),
        bytes(v["buffer_budget"]["in_use"].as_u64().unwrap_or(0)),
        bytes(v["buffer_budget"]["limit"].as_u64().unwrap_or(0)),
    );
    println!("exports:");
    for e in v["exports"].as_array().into_iter().flatten() {
        let s = &e["stats"];
        println!(
            "  {:<16} {:<12} {} connection(s), {} reads ({}), {} writes ({}), {} flushes",
            e["name"].as_str().unwrap_or("?"),
            e["state"].as_str().unwrap_or("?"),
            e["connections"],
            s["reads"],
            bytes(s["read_bytes"].as_u64().unwrap_or(0)),
            s["writes"],
            bytes(s["write_bytes"].as_u64().unwrap_or(0)),
            s["flushes"],
        );
        if let Some(vol) = e["volume"].as_object() {
            println!(
                "    volume {} ({}{}), key {} version {}: {} (CMK {})",
                vol["id"].as_str().unwrap_or("?"),
                bytes(vol["size"].as_u64().unwrap_or(0)),
                if vol["read_only"].as_bool() == Some(true) {
                    ", read-only"
                } else {
                    ""
                },
                vol["key"]["id"].as_str().unwrap_or("?"),
                vol["key"]["version"],
                vol["key"]["state"].as_str().unwrap_or("?"),
                vol["key"]["cmk_state"]
                    .as_str()
                    .unwrap_or("state not reported by the key provider"),
            );
        }
    }
    let conns = v["connections"].as_array().cloned().unwrap_or_default();
    println!("connections: {}", conns.len());
    for c in conns {
        println!(
            "  #{:<4} {:<12} {} [{}] {} requests, {}, up {:.0}s",
            c["id"],
            c["export"].as_str().unwrap_or("(handshake)"),
            c["peer"].as_str().unwrap_or("?"),
            c["identity"].as_str().unwrap_or("-"),
            c["requests"],
            bytes(c["bytes"].as_u64().unwrap_or(0)),
            c["uptime_s"].as_f64().unwrap_or(0.0),
        );
    }
}

fn print_detach(v: &Value) {
    println!(
        "detached {}: {} connection(s) closed{}, volume flushed and closed, data key {}",
        v["export"].as_str().unwrap_or("?"),
        v["connections_closed"],
        if v["connections_cut"].as_bool() == Some(true) {
            " (some cut after the grace period)"
        } else {
            ""
        },
        if v["key_dropped"].as_bool() == Some(true) {
            "dropped from memory"
        } else {
            "still referenced (see the server log)"
        }
    );
}

fn print_attach(v: &Value) {
    println!(
        "attached {}: volume {}, key {} version {}, {}",
        v["export"].as_str().unwrap_or("?"),
        v["volume_id"].as_str().unwrap_or("?"),
        v["key_id"].as_str().unwrap_or("?"),
        v["key_version"],
        bytes(v["size"].as_u64().unwrap_or(0)),
    );
}

/// One export's counters at one instant, as `top` compares them.
#[derive(Clone, Copy, Default)]
struct Sample {
    reads: u64,
    writes: u64,
    read_bytes: u64,
    write_bytes: u64,
    read_lat: (u64, u64),
    write_lat: (u64, u64),
}

fn sample(e: &Value) -> Sample {
    let s = &e["stats"];
    let n = |v: &Value| v.as_u64().unwrap_or(0);
    let lat = |k: &str| (n(&s["latency"][k]["count"]), n(&s["latency"][k]["sum_us"]));
    Sample {
        reads: n(&s["reads"]),
        writes: n(&s["writes"]),
        read_bytes: n(&s["read_bytes"]),
        write_bytes: n(&s["write_bytes"]),
        read_lat: lat("read"),
        write_lat: lat("write"),
    }
}

/// Mean latency in µs of the requests between two (count, sum) readings.
fn mean_us(a: (u64, u64), b: (u64, u64)) -> f64 {
    let n = b.0.saturating_sub(a.0);
    if n == 0 {
        0.0
    } else {
        b.1.saturating_sub(a.1) as f64 / n as f64
    }
}

/// The `top` rows for the change from `before` to `now` over `secs`.
fn top_rows(before: &[(String, Sample)], now: &[(String, Value)], secs: f64) -> Vec<Value> {
    now.iter()
        .map(|(name, e)| {
            let b = sample(e);
            let a = before
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, s)| *s)
                .unwrap_or(b);
            let rate = |x: u64, y: u64| y.saturating_sub(x) as f64 / secs;
            serde_json::json!({
                "export": name,
                "state": e["state"],
                "connections": e["connections"],
                "read_bytes_per_s": rate(a.read_bytes, b.read_bytes),
                "write_bytes_per_s": rate(a.write_bytes, b.write_bytes),
                "read_iops": rate(a.reads, b.reads),
                "write_iops": rate(a.writes, b.writes),
                "read_latency_us": mean_us(a.read_lat, b.read_lat),
                "write_latency_us": mean_us(a.write_lat, b.write_lat),
                "in_flight": e["stats"]["in_flight"],
            })
        })
        .collect()
}

fn top(
    path: &std::path::Path,
    interval: Duration,
    iterations: Option<u64>,
    json: bool,
) -> anyhow::Result<()> {
    let screen = iterations.is_none() && !json && std::io::stdout().is_terminal();
    let exports = |v: &Value| -> Vec<(String, Value)> {
        v["exports"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|e| (e["name"].as_str().unwrap_or("?").to_string(), e.clone()))
            .collect()
    };
    let mut before: Vec<(String, Sample)> = Vec::new();
    let mut at = Instant::now();
    let mut done = 0u64;
    loop {
        let v = client::call(path, &Request::Status)?;
        let now = Instant::now();
        let ex = exports(&v);
        let rows = top_rows(&before, &ex, now.duration_since(at).as_secs_f64().max(1e-3));
        // The first reading has no interval before it: it only sets the baseline.
        if !before.is_empty() || iterations == Some(0) {
            let mut out = std::io::stdout().lock();
            if json {
                writeln!(out, "{}", Value::Array(rows))?;
            } else {
                if screen {
                    // Clear the screen and home the cursor.
                    write!(out, "\x1b[2J\x1b[H")?;
                }
                writeln!(
                    out,
                    "cryptnbd top — pid {}, {} connection(s), every {:?}",
                    v["pid"],
                    v["connections"].as_array().map_or(0, |c| c.len()),
                    interval
                )?;
                writeln!(
                    out,
                    "{:<16} {:>5} {:>11} {:>11} {:>9} {:>9} {:>10} {:>10} {:>6}",
                    "EXPORT",
                    "CONNS",
                    "READ/s",
                    "WRITE/s",
                    "R IOPS",
                    "W IOPS",
                    "R LAT µs",
                    "W LAT µs",
                    "INFL"
                )?;
                for r in rows {
                    let f = |k: &str| r[k].as_f64().unwrap_or(0.0);
                    writeln!(
                        out,
                        "{:<16} {:>5} {:>11} {:>11} {:>9.0} {:>9.0} {:>10.1} {:>10.1} {:>6}",
                        r["export"].as_str().unwrap_or("?"),
                        r["connections"],
                        bytes(f("read_bytes_per_s") as u64),
                        bytes(f("write_bytes_per_s") as u64),
                        f("read_iops"),
                        f("write_iops"),
                        f("read_latency_us"),
                        f("write_latency_us"),
                        r["in_flight"],
                    )?;
                }
            }
            out.flush()?;
            done += 1;
            if iterations.is_some_and(|n| done >= n) {
                return Ok(());
            }
        }
        before = ex.iter().map(|(n, e)| (n.clone(), sample(e))).collect();
        at = now;
        std::thread::sleep(interval);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn export(reads: u64, read_bytes: u64, lat_n: u64, lat_sum: u64) -> Value {
        json!({"name": "d", "state": "attached", "connections": 1, "stats": {
            "reads": reads, "writes": 0, "read_bytes": read_bytes, "write_bytes": 0,
            "in_flight": 0,
            "latency": {"read": {"count": lat_n, "sum_us": lat_sum},
                        "write": {"count": 0, "sum_us": 0}}}})
    }

    #[test]
    fn top_rates_are_deltas_over_the_interval() {
        let before = vec![("d".to_string(), sample(&export(100, 4096 * 100, 100, 1000)))];
        let now = vec![("d".to_string(), export(300, 4096 * 300, 300, 5000))];
        let rows = top_rows(&before, &now, 2.0);
        assert_eq!(rows[0]["read_iops"], json!(100.0));
        assert_eq!(rows[0]["read_bytes_per_s"], json!(409600.0));
        assert_eq!(rows[0]["read_latency_us"], json!(20.0));
        assert_eq!(rows[0]["write_iops"], json!(0.0));
        assert_eq!(bytes(409600), "400.0 KiB");
    }
}
