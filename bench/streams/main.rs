//! The peers of `bench/streams.sh`: many concurrent SSE streams through a gateway process.
//!
//! `streams sim --words W --latency-ms L` runs the project's simulator (`portcullis::sim`)
//! on a loopback port, answering every streamed chat with W words, one event every L ms, and
//! prints `listening http://127.0.0.1:PORT`. It runs in its own process so the gateway's
//! resident set is the gateway's alone.
//!
//! `streams load --addr A --streams N --rate R --pid P [--kib K]` opens N HTTP/1.1
//! connections to the gateway at A, R per second, each one streaming chat request, and reads
//! them all at once. Every second it prints what is open, the events and bytes received,
//! and the resident set of process P (the gateway); at the end, the RSS before any stream
//! (baseline), when all N were open (their heads received), once every stream had received
//! K KiB of events, the peak, and per stream the growth over the baseline. A stream is
//! *stalled* when more than 3 s pass without a byte from the gateway before it ends (the
//! simulator sends one event per L ms, so with L = 1000 any gap over 3 s is the gateway's);
//! a *failure* is a connect error, a status other than 200, or a stream that ends before its
//! terminal chunk. The exit status is 1 when any stream stalled or failed.
//!
//! Both run on one current-thread runtime each (the box has two cores and the gateway is the
//! process under test); everything listens and connects on 127.0.0.1 only.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A gap longer than this between two reads of one stream is a stall.
const STALL: Duration = Duration::from_secs(3);

fn arg<T: std::str::FromStr>(args: &[String], name: &str, default: Option<T>) -> T {
    let flag = format!("--{name}");
    match args.iter().position(|a| *a == flag) {
        Some(i) => args
            .get(i + 1)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("bad value for {flag}")),
        None => default.unwrap_or_else(|| panic!("{flag} is required")),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    match args.first().map(String::as_str) {
        Some("sim") => rt.block_on(sim(&args)),
        Some("load") => {
            let ok = rt.block_on(load(&args));
            std::process::exit(if ok { 0 } else { 1 });
        }
        _ => {
            eprintln!("usage: streams sim --words W --latency-ms L | streams load --addr A --streams N --rate R --pid P [--kib K]");
            std::process::exit(2);
        }
    }
}

async fn sim(args: &[String]) {
    let words: usize = arg(args, "words", Some(40));
    let latency: u64 = arg(args, "latency-ms", Some(1000));
    let sim = portcullis::sim::SimHandle::start(portcullis::sim::SimOptions {
        token_latency: Duration::from_millis(latency),
        answer_words: words,
        ..portcullis::sim::SimOptions::default()
    })
    .await
    .unwrap();
    println!("listening {}", sim.url());
    std::future::pending::<()>().await;
}

/// Resident set of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

#[derive(Default)]
struct Stats {
    connected: AtomicU64,
    heads: AtomicU64,
    events: AtomicU64,
    bytes: AtomicU64,
    done: AtomicU64,
    failed: AtomicU64,
    stalled: AtomicU64,
    max_gap_ms: AtomicU64,
    /// Streams that have received at least the target KiB.
    reached: AtomicU64,
}

async fn load(args: &[String]) -> bool {
    let addr: String = arg(args, "addr", None);
    let n: u64 = arg(args, "streams", None);
    let rate: u64 = arg(args, "rate", Some(1000));
    let pid: u32 = arg(args, "pid", None);
    let kib: u64 = arg(args, "kib", Some(4));
    let stats = Arc::new(Stats::default());
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let baseline = rss_kib(pid);
    println!(
        "baseline RSS {} KiB; opening {n} streams at {rate}/s",
        baseline
    );

    let monitor = {
        let stats = stats.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut peak = 0u64;
            let mut open_rss: Option<(u64, f64)> = None;
            let mut kib_rss: Option<(u64, f64)> = None;
            let mut tick = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let rss = rss_kib(pid);
                peak = peak.max(rss);
                let heads = stats.heads.load(Ordering::SeqCst);
                let failed = stats.failed.load(Ordering::SeqCst);
                let per = |b: u64| b as f64 / n as f64 / 1024.0;
                if open_rss.is_none() && heads + failed >= n {
                    open_rss = Some((rss, per(stats.bytes.load(Ordering::SeqCst))));
                }
                if kib_rss.is_none() && stats.reached.load(Ordering::SeqCst) + failed >= n {
                    kib_rss = Some((rss, per(stats.bytes.load(Ordering::SeqCst))));
                }
                if tick.is_multiple_of(4) {
                    println!(
                        "t={:>5.1}s connected {} open {} done {} failed {} stalled {} events {} ({:.1} KiB/stream) RSS {} KiB",
                        start.elapsed().as_secs_f64(),
                        stats.connected.load(Ordering::SeqCst),
                        heads - stats.done.load(Ordering::SeqCst),
                        stats.done.load(Ordering::SeqCst),
                        failed,
                        stats.stalled.load(Ordering::SeqCst),
                        stats.events.load(Ordering::SeqCst),
                        per(stats.bytes.load(Ordering::SeqCst)),
                        rss
                    );
                }
                tick += 1;
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            (peak, open_rss, kib_rss)
        })
    };

    let mut tasks = Vec::with_capacity(n as usize);
    let gap = Duration::from_secs_f64(1.0 / rate as f64);
    let mut next = tokio::time::Instant::now();
    for i in 0..n {
        tokio::time::sleep_until(next).await;
        next += gap;
        let (addr, stats) = (addr.clone(), stats.clone());
        tasks.push(tokio::spawn(async move {
            if let Err(e) = stream(&addr, i, kib * 1024, &stats).await {
                if stats.failed.fetch_add(1, Ordering::SeqCst) < 5 {
                    eprintln!("stream {i}: {e}");
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    stop.store(true, Ordering::SeqCst);
    let (peak, open, after) = monitor.await.unwrap();
    let end = rss_kib(pid);
    let failed = stats.failed.load(Ordering::SeqCst);
    let stalled = stats.stalled.load(Ordering::SeqCst);
    let per = |rss: u64| (rss.saturating_sub(baseline)) as f64 / n as f64;
    println!("--- {n} streams through the gateway (pid {pid})");
    println!(
        "baseline RSS           {:>8.1} MiB",
        baseline as f64 / 1024.0
    );
    if let Some((rss, got)) = open {
        println!(
            "all open               {:>8.1} MiB  ({:.1} KiB per stream; {got:.1} KiB received per stream by then)",
            rss as f64 / 1024.0,
            per(rss)
        );
    }
    if let Some((rss, got)) = after {
        println!(
            "after >= {kib} KiB each    {:>8.1} MiB  ({:.1} KiB per stream; {got:.1} KiB received per stream by then)",
            rss as f64 / 1024.0,
            per(rss)
        );
    }
    println!(
        "peak                   {:>8.1} MiB  ({:.1} KiB per stream)",
        peak as f64 / 1024.0,
        per(peak)
    );
    println!("after all ended        {:>8.1} MiB", end as f64 / 1024.0);
    println!(
        "events {}, {:.1} KiB per stream, longest gap {} ms, stalled (gap > {} s) {stalled}, failed {failed}, completed {}",
        stats.events.load(Ordering::SeqCst),
        stats.bytes.load(Ordering::SeqCst) as f64 / n as f64 / 1024.0,
        stats.max_gap_ms.load(Ordering::SeqCst),
        STALL.as_secs(),
        stats.done.load(Ordering::SeqCst),
    );
    stalled == 0 && failed == 0
}

/// One streaming chat through the gateway, read to its terminal chunk.
async fn stream(addr: &str, i: u64, target: u64, stats: &Stats) -> Result<(), String> {
    let body = format!(
        "{{\"model\":\"gpt-4o\",\"stream\":true,\"messages\":[{{\"role\":\"user\",\"content\":\"Stream {i}, one event a second.\"}}]}}"
    );
    let req = format!(
        "POST /openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21 HTTP/1.1\r\nhost: gateway\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    stats.connected.fetch_add(1, Ordering::SeqCst);
    s.write_all(req.as_bytes())
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut buf = vec![0u8; 4096];
    let mut head = Vec::new();
    // The head.
    let mut rest = loop {
        let n = s.read(&mut buf).await.map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            return Err("closed before the head".into());
        }
        head.extend_from_slice(&buf[..n]);
        if let Some(at) = memchr::memmem::find(&head, b"\r\n\r\n") {
            if !head.starts_with(b"HTTP/1.1 200") {
                let line = String::from_utf8_lossy(&head[..head.len().min(80)]).into_owned();
                return Err(format!("status: {line}"));
            }
            break head.split_off(at + 4);
        }
    };
    stats.heads.fetch_add(1, Ordering::SeqCst);
    let mut got = 0u64;
    // The last bytes of the previous read, for markers split across reads.
    let mut tail: Vec<u8> = Vec::new();
    let mut last = Instant::now();
    let mut stalled = false;
    loop {
        if !rest.is_empty() {
            let mut seen = std::mem::take(&mut tail);
            seen.extend_from_slice(&rest);
            let events = memchr::memmem::find_iter(&seen, b"data: ").count() as u64;
            stats.events.fetch_add(events, Ordering::SeqCst);
            stats.bytes.fetch_add(rest.len() as u64, Ordering::SeqCst);
            if got < target && got + rest.len() as u64 >= target {
                stats.reached.fetch_add(1, Ordering::SeqCst);
            }
            got += rest.len() as u64;
            if seen.ends_with(b"\r\n0\r\n\r\n") || seen == b"0\r\n\r\n" {
                stats.done.fetch_add(1, Ordering::SeqCst);
                if got < target {
                    stats.reached.fetch_add(1, Ordering::SeqCst);
                }
                return Ok(());
            }
            tail = seen[seen.len().saturating_sub(8)..].to_vec();
        }
        let n = s.read(&mut buf).await.map_err(|e| format!("read: {e}"))?;
        let gap = last.elapsed();
        last = Instant::now();
        stats
            .max_gap_ms
            .fetch_max(gap.as_millis() as u64, Ordering::SeqCst);
        if gap > STALL && !stalled {
            stalled = true;
            stats.stalled.fetch_add(1, Ordering::SeqCst);
        }
        if n == 0 {
            return Err("closed before the end of the stream".into());
        }
        rest = buf[..n].to_vec();
    }
}
