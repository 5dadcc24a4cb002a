"""Watch, frame by frame, how the gateway ends an HTTP/2 request it refuses before reading
the body (RFC 9113 section 8.1: a complete response, then at most RST_STREAM NO_ERROR).

Run by tests/tls.rs with GATEWAY_PORT, GATEWAY_CA, CLIENT_CERT, CLIENT_KEY and ATTEMPTS.
Each attempt opens a TLS connection (ALPN h2) presenting the certificate, sends a POST's
HEADERS, and on odd attempts its DATA too. Prints one JSON line per attempt: the stream's
events in order, e.g. ["status:403", "data", "end", "reset:0"].
"""
import json
import os
import socket
import ssl

import h2.config
import h2.connection
import h2.events
import h2.exceptions

PORT = int(os.environ["GATEWAY_PORT"])
BODY = b'{"model":"gpt-4o","messages":[{"role":"user","content":"Hello there"}]}'


def attempt(send_body):
    ctx = ssl.create_default_context(cafile=os.environ["GATEWAY_CA"])
    ctx.load_cert_chain(os.environ["CLIENT_CERT"], os.environ["CLIENT_KEY"])
    ctx.set_alpn_protocols(["h2"])
    sock = ctx.wrap_socket(socket.create_connection(("127.0.0.1", PORT), timeout=5), server_hostname="localhost")
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    conn.send_headers(1, [
        (":method", "POST"), (":path", "/v1/chat/completions"), (":scheme", "https"),
        (":authority", "localhost"), ("content-type", "application/json"),
        ("content-length", str(len(BODY))),
    ])
    if send_body:
        conn.send_data(1, BODY, end_stream=True)
    sock.sendall(conn.data_to_send())
    seen = []
    try:
        while not seen or seen[-1] not in ("end", "eof") and not seen[-1].startswith("reset"):
            data = sock.recv(65535)
            if not data:
                seen.append("eof")
                break
            for e in conn.receive_data(data):
                if isinstance(e, h2.events.ResponseReceived):
                    seen.append("status:" + dict(e.headers)[b":status"].decode())
                elif isinstance(e, h2.events.DataReceived):
                    conn.acknowledge_received_data(e.flow_controlled_length, e.stream_id)
                    if seen[-1:] != ["data"]:
                        seen.append("data")
                elif isinstance(e, h2.events.StreamEnded):
                    seen.append("end")
                elif isinstance(e, h2.events.StreamReset):
                    seen.append(f"reset:{int(e.error_code)}")
            sock.sendall(conn.data_to_send())
        # A reset may follow the end of the response: wait briefly for it.
        if seen[-1:] == ["end"] and not send_body:
            sock.settimeout(0.5)
            try:
                data = sock.recv(65535)
                for e in conn.receive_data(data) if data else []:
                    if isinstance(e, h2.events.StreamReset):
                        seen.append(f"reset:{int(e.error_code)}")
            except (socket.timeout, TimeoutError):
                pass
    except (OSError, h2.exceptions.ProtocolError) as err:
        seen.append("error:" + type(err).__name__)
    sock.close()
    return seen


for i in range(int(os.environ["ATTEMPTS"])):
    print(json.dumps(attempt(i % 2 == 1)), flush=True)
