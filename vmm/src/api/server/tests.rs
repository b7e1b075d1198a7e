//! The server in-process on a real socket and event loop, with a handler that only
//! records: the cap, idle and slow clients, and the timer that must not spin.

use std::io::BufRead;

use event_manager::{EventManager, SubscriberId, SubscriberOps};
use serde_json::json;

use super::*;

/// Records the commands; takes `.1` to answer each (a slow `pause`).
#[derive(Default)]
struct Recorder(Vec<Command>, Duration);

impl Handler for Recorder {
    fn handle(&mut self, command: &Command) -> Result<Value, String> {
        self.0.push(command.clone());
        std::thread::sleep(self.1);
        Ok(json!({}))
    }
}

struct Harness {
    em: EventManager<ApiServer>,
    id: SubscriberId,
    socket: ApiSocket,
    calls: Rc<RefCell<Recorder>>,
}

impl Harness {
    fn new(name: &str, timeout: Duration) -> Self {
        let path =
            std::env::temp_dir().join(format!("hpcvm-unit-{name}-{}.sock", std::process::id()));
        let socket = ApiSocket::bind(&path).unwrap();
        let calls = Rc::new(RefCell::new(Recorder::default()));
        let handler: Rc<RefCell<dyn Handler>> = calls.clone();
        let server = socket
            .server(handler)
            .unwrap()
            .with_request_timeout(timeout);
        let mut em = EventManager::new().unwrap();
        let id = em.add_subscriber(server);
        Self {
            em,
            id,
            socket,
            calls,
        }
    }

    /// Runs the loop for `d`; returns how many events it dispatched.
    fn pump(&mut self, d: Duration) -> usize {
        let end = Instant::now() + d;
        let mut events = 0;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return events;
            }
            events += self
                .em
                .run_with_timeout(left.as_millis().max(1) as i32)
                .unwrap();
        }
    }

    /// Runs the loop until nothing is ready.
    fn settle(&mut self) {
        while self.em.run_with_timeout(0).unwrap() > 0 {}
    }

    fn connect(&mut self) -> UnixStream {
        let s = UnixStream::connect(self.socket.path()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        self.settle();
        s
    }

    fn clients(&mut self) -> usize {
        self.em.subscriber_mut(self.id).unwrap().clients.len()
    }
}

fn read_line(s: &UnixStream) -> String {
    let mut line = String::new();
    io::BufReader::new(s).read_line(&mut line).unwrap();
    line
}

/// Whether the server closed `s` (after whatever it sent) rather than keeping it.
fn closed(s: &UnixStream) -> bool {
    s.set_nonblocking(true).unwrap();
    let mut rest = Vec::new();
    let r = (&*s).read_to_end(&mut rest);
    s.set_nonblocking(false).unwrap();
    r.is_ok()
}

#[test]
fn at_the_cap_the_longest_idle_client_makes_room_and_destroy_is_served() {
    let mut h = Harness::new("cap", REQUEST_TIMEOUT);
    let mut idle: Vec<UnixStream> = (0..MAX_CLIENTS).map(|_| h.connect()).collect();
    assert_eq!(h.clients(), MAX_CLIENTS);
    // The oldest connection asks something: it is no longer the idlest.
    idle[0]
        .write_all(b"{\"id\":1,\"cmd\":\"status\"}\n")
        .unwrap();
    h.settle();
    assert!(read_line(&idle[0]).contains(r#""ok":true"#));

    let extra: Vec<UnixStream> = (0..10).map(|_| h.connect()).collect();
    assert_eq!(h.clients(), MAX_CLIENTS, "the cap holds");
    for (i, s) in idle.iter().enumerate().skip(1).take(10) {
        let line = read_line(s);
        assert!(line.contains("idle longest"), "client {i}: {line}");
        assert!(closed(s), "client {i} evicted");
    }
    assert!(!closed(&idle[0]), "the recently active client stays");
    assert!(!closed(&idle[11]), "only as many as needed are evicted");
    assert!(
        extra.iter().all(|s| !closed(s)),
        "every newcomer was accepted"
    );

    // A full house of idle clients never keeps the controller out.
    let mut ctl = h.connect();
    ctl.write_all(b"{\"id\":\"x\",\"cmd\":\"destroy\"}\n")
        .unwrap();
    h.settle();
    let reply = read_line(&ctl);
    assert!(
        reply.contains(r#""ok":true"#) && reply.contains(r#""id":"x""#),
        "{reply}"
    );
    assert_eq!(h.calls.borrow().0, [Command::Status, Command::Destroy]);
}

#[test]
fn unfinished_lines_time_out_while_idle_clients_stay() {
    let timeout = Duration::from_millis(300);
    let mut h = Harness::new("slowloris", timeout);
    let idle = h.connect();
    let mut stalled = h.connect();
    stalled.write_all(b"{\"cmd\":\"sta").unwrap();
    let mut trickle = h.connect();
    let mut finisher = h.connect();
    finisher.write_all(b"{\"cmd\":").unwrap();
    h.settle();

    // One byte every 50 ms never finishes a line; the finisher completes in time.
    for i in 0..12 {
        let _ = trickle.write_all(b"x");
        if i == 2 {
            finisher.write_all(b"\"status\"}\n").unwrap();
        }
        h.pump(Duration::from_millis(50));
    }
    for (what, s) in [("stalled", &stalled), ("trickle", &trickle)] {
        let line = read_line(s);
        assert!(
            line.contains("request line not completed within 0.3 s"),
            "{what}: {line}"
        );
        assert!(closed(s), "{what} dropped");
    }
    assert!(read_line(&finisher).contains(r#""ok":true"#));
    assert!(!closed(&finisher), "a client that finished its line stays");
    assert!(
        !closed(&idle),
        "an idle client stays until its place is needed"
    );
    assert_eq!(h.clients(), 2);
    assert_eq!(
        h.pump(Duration::from_millis(200)),
        0,
        "nothing left to wake for"
    );
}

#[test]
fn a_waiting_partial_line_does_not_spin_the_loop() {
    let mut h = Harness::new("nospin", Duration::from_millis(300));
    let mut s = h.connect();
    s.write_all(b"{\"cmd\"").unwrap();
    // Before the deadline: the read of the bytes, and nothing else.
    let early = h.pump(Duration::from_millis(250));
    assert!(early <= 1, "{early} wake-ups before the deadline");
    let late = h.pump(Duration::from_millis(250));
    assert!(late <= 2, "{late} wake-ups for one deadline");
    assert!(read_line(&s).contains("not completed"));
    assert!(closed(&s));
    assert_eq!(h.clients(), 0);
}

#[test]
fn pipelined_blank_and_split_lines_are_all_answered_in_order() {
    let mut h = Harness::new("pipeline", REQUEST_TIMEOUT);
    let mut s = h.connect();
    s.write_all(b"\n{\"id\":1,\"cmd\":\"status\"}\n  \n{\"id\":2,\"cmd\":\"pa")
        .unwrap();
    h.settle();
    s.write_all(b"use\"}\n{\"id\":3,\"cmd\":\"resume\"}\n")
        .unwrap();
    h.settle();
    let mut r = io::BufReader::new(&s);
    for id in 1..=3 {
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        assert!(line.contains(&format!("\"id\":{id},\"ok\":true")), "{line}");
    }
    assert_eq!(
        h.calls.borrow().0,
        [Command::Status, Command::Pause, Command::Resume]
    );
}

#[test]
fn a_flood_of_requests_from_one_client_never_holds_up_another() {
    let mut h = Harness::new("flood", REQUEST_TIMEOUT);
    h.calls.borrow_mut().1 = Duration::from_millis(5);
    let mut flood = h.connect();
    let mut ctl = h.connect();
    let many: Vec<u8> = (0..200)
        .flat_map(|i| format!("{{\"id\":{i},\"cmd\":\"status\"}}\n").into_bytes())
        .collect();
    flood.write_all(&many).unwrap();
    // The whole flood is read in the first turn, but only a turn's worth answered.
    h.pump(Duration::from_millis(30));
    ctl.write_all(b"{\"id\":\"x\",\"cmd\":\"destroy\"}\n")
        .unwrap();
    h.pump(Duration::from_millis(2000));
    let calls = h.calls.borrow().0.clone();
    assert_eq!(calls.len(), 201, "every request answered");
    let at = calls.iter().position(|c| *c == Command::Destroy).unwrap();
    assert!(at < 64, "destroy waited for {at} of the flood's requests");
    assert!(read_line(&ctl).contains(r#""id":"x","ok":true"#));
    let mut r = io::BufReader::new(&flood);
    for id in 0..200 {
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        assert!(line.contains(&format!("\"id\":{id},\"ok\":true")), "{line}");
    }
}

#[test]
fn at_the_cap_a_burst_of_newcomers_cannot_evict_one_before_it_is_read() {
    let mut h = Harness::new("burst", REQUEST_TIMEOUT);
    let _idle: Vec<UnixStream> = (0..MAX_CLIENTS).map(|_| h.connect()).collect();
    // The controller connects and sends destroy, then a burst arrives behind it
    // before the loop runs again.
    let mut ctl = UnixStream::connect(h.socket.path()).unwrap();
    ctl.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    ctl.write_all(b"{\"id\":\"x\",\"cmd\":\"destroy\"}\n")
        .unwrap();
    let _burst: Vec<UnixStream> = (0..2 * MAX_CLIENTS)
        .map(|_| UnixStream::connect(h.socket.path()).unwrap())
        .collect();
    h.settle();
    let reply = read_line(&ctl);
    assert!(reply.contains(r#""id":"x","ok":true"#), "{reply}");
    assert!(h.calls.borrow().0.contains(&Command::Destroy));
}
