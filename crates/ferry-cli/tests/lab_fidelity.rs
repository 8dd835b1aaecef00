//! The emulated WAN behaves like the link it claims to be, as independent tools measure it:
//! ping for RTT, iperf3 for TCP throughput and UDP loss.
mod common;
use common::*;

#[test]
fn ping_rtt_matches_the_configured_rtt() {
    let _serial = serial();
    println!("{:>10} {:>10} {:>10} {:>10}", "rtt (ms)", "median", "mean", "tolerance");
    for rtt in [0.0f64, 20.0, 120.0, 200.0] {
        let lab = Lab::up("trtt", &["--no-client", "--rtt", &format!("{rtt}ms")]);
        let out = lab.exec_ok("a", &["ping", "-n", "-c", "40", "-i", "0.05", "198.18.0.2"]);
        let times = ping_times(&out);
        assert_eq!(times.len(), 40, "every ping answered:\n{out}");
        let (med, mean) = (median(&times), times.iter().sum::<f64>() / times.len() as f64);
        let tolerance = (rtt * 0.02).max(0.3);
        println!("{rtt:>10.1} {med:>10.3} {mean:>10.3} {tolerance:>10.3}");
        assert!((med - rtt).abs() <= tolerance, "rtt {rtt} ms: median {med:.3} ms is outside ±{tolerance:.3} ms");
    }
}

fn iperf3_json(lab: &Lab, args: &[&str]) -> serde_json::Value {
    lab.exec_ok("b", &["iperf3", "-s", "-D", "-1"]);
    std::thread::sleep(std::time::Duration::from_millis(300));
    let mut cmd = vec!["iperf3", "-c", "198.18.0.2", "-J"];
    cmd.extend_from_slice(args);
    serde_json::from_str(&lab.exec_ok("a", &cmd)).expect("iperf3 JSON")
}

#[test]
fn one_tcp_flow_fills_a_1gbit_link_at_0ms() {
    let _serial = serial();
    let lab = Lab::up("ttcp0", &["--no-client", "--rtt", "0ms", "--rate", "1gbit"]);
    let j = iperf3_json(&lab, &["-t", "8"]);
    let bps = j["end"]["sum_received"]["bits_per_second"].as_f64().unwrap();
    println!("one TCP flow at 0 ms: {:.0} Mbit/s ({:.1} % of 1 Gbit/s)", bps / 1e6, bps / 1e7);
    assert!(bps >= 0.90e9, "one flow reached only {:.0} Mbit/s", bps / 1e6);
}

#[test]
fn eight_tcp_flows_use_a_long_link() {
    let _serial = serial();
    let lab = Lab::up("ttcp8", &["--no-client", "--rtt", "120ms", "--rate", "1gbit"]);
    let before = lab.direction("a", "b")["delivered_bytes"].as_u64().unwrap();
    let j = iperf3_json(&lab, &["-P", "8", "-t", "15"]);
    let after = lab.direction("a", "b")["delivered_bytes"].as_u64().unwrap();
    let bps = j["end"]["sum_received"]["bits_per_second"].as_f64().unwrap();
    let secs = j["end"]["sum_received"]["seconds"].as_f64().unwrap();
    let link_use = (after - before) as f64 * 8.0 / secs / 1e9;
    println!("8 flows at 120 ms over {secs:.1} s: goodput {:.0} Mbit/s, link carried {:.1} %", bps / 1e6, link_use * 100.0);
    assert!(bps >= 0.80e9, "8 flows reached only {:.0} Mbit/s", bps / 1e6);
}

#[test]
fn configured_loss_is_observed() {
    let _serial = serial();
    let p = 0.02;
    let lab = Lab::up("tloss", &["--no-client", "--rtt", "10ms", "--loss", "2%"]);
    // 20 000 datagrams of 1000 B at 40 Mbit/s: far below the rate, so every drop is the loss.
    let j = iperf3_json(&lab, &["-u", "-b", "40M", "-l", "1000", "-k", "20000"]);
    let sum = &j["end"]["sum"];
    let (lost, total) = (sum["lost_packets"].as_f64().unwrap(), sum["packets"].as_f64().unwrap());
    let bound = 4.0 * (total * p * (1.0 - p)).sqrt();
    println!("loss {:.0}/{:.0} = {:.3} % (configured {:.1} %, 4σ bound ±{:.0} packets)", lost, total, lost / total * 100.0, p * 100.0, bound);
    assert!(total >= 19_000.0, "iperf3 sent {total} datagrams");
    assert!((lost - total * p).abs() <= bound, "lost {lost} of {total}, expected {:.0} ± {bound:.0}", total * p);
    let drops = lab.direction("a", "b")["drops_loss"].as_f64().unwrap();
    assert!((drops - lost).abs() <= total * 0.001 + 2.0, "forwarder counted {drops} loss drops, iperf3 {lost}");
}
