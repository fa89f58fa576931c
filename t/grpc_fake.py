#!/usr/bin/python3
# A hostile gRPC endpoint for t/017_grpc_hostile.pl: an HTTP/2 server with
# prior knowledge (h2c) on a loopback port, which answers every call in one
# broken way, chosen by MODE.  Usage: grpc_fake.py MODE PORT
# Prints "listening PORT" once it accepts connections.
import socket
import sys
import threading

import h2.config
import h2.connection
import h2.events
import h2.exceptions

mode, port = sys.argv[1], int(sys.argv[2])


def frame(payload, flag=0, length=None):
    n = len(payload) if length is None else length
    return bytes([flag]) + n.to_bytes(4, 'big') + payload


def answer(conn, sid, outbox):
    """Headers, body and trailers of the answer to one call, per mode; a
    body waits in outbox for the client's flow-control window."""
    ok = [(':status', '200'), ('content-type', 'application/grpc')]
    status0 = [('grpc-status', '0')]
    if mode == 'silent':
        return
    if mode == 'http500':
        conn.send_headers(sid, [(':status', '500'), ('content-type', 'text/plain')])
        conn.send_data(sid, b'no', end_stream=True)
        return
    if mode == 'unavailable':
        # a trailers-only answer, as gRPC servers send for errors
        conn.send_headers(sid, ok + [('grpc-status', '14'),
                                     ('grpc-message', 'etcdserver%3A no leader')],
                          end_stream=True)
        return
    conn.send_headers(sid, ok)
    if mode == 'garbage':
        # field 1 with wire type 7, which does not exist
        body = frame(b'\x0f\xff\xff\xff')
    elif mode == 'truncated':
        # the frame says 100 bytes and brings 3
        body = frame(b'\x08\x01\x10', length=100)
    elif mode == 'compressed':
        body = frame(b'\x10\x01', flag=1)
    elif mode == 'wiretype':
        # field 1 (header, a message) as a varint
        body = frame(b'\x08\x05')
    elif mode == 'overlong':
        # field 1 (the header) claims 5 bytes, and 3 follow
        body = frame(b'\x0a\x05\x12\xe8\x07')
    elif mode == 'huge':
        body = frame(b'\x22' + b'\x00' * (5 * 1024 * 1024), length=5 * 1024 * 1024 + 1)
    elif mode == 'nostatus':
        conn.send_data(sid, frame(b''), end_stream=True)
        return
    else:
        raise SystemExit('unknown mode ' + mode)
    outbox[sid] = [body, status0]


def flush(conn, outbox):
    """Send what the client's windows allow; trailers once a body is out."""
    for sid in list(outbox):
        body, trailers = outbox[sid]
        try:
            while body:
                n = min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size)
                if n <= 0:
                    break
                conn.send_data(sid, body[:n])
                body = body[n:]
            outbox[sid][0] = body
            if not body:
                conn.send_headers(sid, trailers, end_stream=True)
                del outbox[sid]
        except h2.exceptions.StreamClosedError:
            del outbox[sid]


def serve(sock):
    config = h2.config.H2Configuration(client_side=False, header_encoding='utf-8')
    conn = h2.connection.H2Connection(config=config)
    conn.initiate_connection()
    # room for the huge answer without waiting for window updates
    conn.increment_flow_control_window(2 ** 30)
    sock.sendall(conn.data_to_send())
    pending = []
    outbox = {}
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.RequestReceived):
                    pending.append(event.stream_id)
                elif isinstance(event, h2.events.StreamEnded):
                    if mode == 'close':
                        sock.close()
                        return
                    answer(conn, event.stream_id, outbox)
                elif isinstance(event, h2.events.StreamReset):
                    outbox.pop(event.stream_id, None)
                elif isinstance(event, h2.events.DataReceived):
                    conn.acknowledge_received_data(event.flow_controlled_length,
                                                   event.stream_id)
            flush(conn, outbox)
            out = conn.data_to_send()
            if out:
                sock.sendall(out)
    except (OSError, h2.exceptions.ProtocolError):
        return
    finally:
        sock.close()


listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind(('127.0.0.1', port))
listener.listen(64)
print('listening', port, flush=True)
while True:
    client, _ = listener.accept()
    threading.Thread(target=serve, args=(client,), daemon=True).start()
