"""What the HTTP engines (`sglang_http.py`, `openai_http.py`) stand on, layered as httpx is:

- `client.HTTPClient`: a base URL, headers and JSON in, `HTTPResponse` out (whole bodies,
  byte streams, server-sent events);
- `transport.Transport`: the seam below the client, one exchange at a time. Servers get
  `pool.ConnectionPool`; tests inject `transport.MockTransport` and answer in-process;
- `pool.ConnectionPool` and `connection.Connection`: keep-alive HTTP/1.1 over asyncio with
  the httptools parser;
- `sse.py` (event streams), `errors.py` (upstream answers -> typed engine errors),
  `config.py` (the settings section), `engine.py` (`HTTPEngine`, the engines' shared base),
  `token_count.py` (tokens an upstream did not count).
"""
