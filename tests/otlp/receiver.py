"""An OTLP/HTTP trace receiver for tests/telemetry.rs.

Listens on 127.0.0.1 (port 0: the system picks one), prints `listening <port>` on stdout,
then accepts `POST /v1/traces` with an `application/x-protobuf` body, decodes it as an
`ExportTraceServiceRequest` with the `opentelemetry-proto` package (the OpenTelemetry
project's own generated classes), and appends one JSON line per span to the file named by
its first argument: trace and span ids in hex, parent span id, name, kind, status, the
resource's and the span's attributes (values as plain JSON), and the export request's
headers. Each request's raw body is also appended (hex) to `<file>.raw`, so a test can look
for strings in exactly what was sent. Answers an empty `ExportTraceServiceResponse`.
"""

import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from google.protobuf.json_format import MessageToDict
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

OUT = sys.argv[1]


def value(v):
    kind = v.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [value(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: value(kv.value) for kv in v.kvlist_value.values}
    if kind == "bytes_value":
        return v.bytes_value.hex()
    return getattr(v, kind)


def attributes(kvs):
    return {kv.key: value(kv.value) for kv in kvs}


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", "0")))
        if self.path != "/v1/traces":
            self.send_response(404)
            self.end_headers()
            return
        req = ExportTraceServiceRequest()
        req.ParseFromString(body)
        headers = {k.lower(): v for k, v in self.headers.items()}
        lines = []
        for rs in req.resource_spans:
            resource = attributes(rs.resource.attributes)
            for ss in rs.scope_spans:
                for s in ss.spans:
                    lines.append(
                        {
                            "trace_id": s.trace_id.hex(),
                            "span_id": s.span_id.hex(),
                            "parent_span_id": s.parent_span_id.hex(),
                            "name": s.name,
                            "kind": Span.SpanKind.Name(s.kind),
                            "status": Status.StatusCode.Name(s.status.code),
                            "status_message": s.status.message,
                            "start_ns": s.start_time_unix_nano,
                            "end_ns": s.end_time_unix_nano,
                            "attributes": attributes(s.attributes),
                            "resource": resource,
                            "scope": ss.scope.name,
                            "headers": headers,
                            "proto": MessageToDict(s),
                        }
                    )
        with open(OUT + ".raw", "a") as f:
            f.write(body.hex() + "\n")
        with open(OUT, "a") as f:
            for line in lines:
                f.write(json.dumps(line) + "\n")
        answer = ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args):
        pass


server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
print(f"listening {server.server_address[1]}", flush=True)
server.serve_forever()
