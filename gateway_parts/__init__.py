"""The gateway's production parts, one module each, as serving/ holds the model server's.

gateway.py (generated from notebook 02) is the course's path: preprocess, predict, postprocess and the Flask app.
It imports these; notebook 04 ("The gateway in production") says why each exists and shows it working:

- settings: everything the gateway can be told, from the environment
- errors: failures as the HTTP status and code a client gets, and the app's JSON error answers
- intake: what a request brings (its images, its id)
- images: decoding a stranger's image bytes safely, upright and in RGB
- fetching: a request's URLs, fetched in parallel within one deadline (safe_fetch.py fetches each)
- signatures: which signature a batch goes to, and what it takes on the wire (float32 or uint8)
- model_client: the model tier behind one gRPC channel (round robin, deadlines, a second try, version changes)
- discovery: the model tier's name looked up every few seconds, so the channel follows its pods
- metrics: Prometheus counters, across gunicorn's workers
- documents: the page and the API document the gateway serves
- admission: who works, who waits and who is shed, by queueing delay
- refusals: how a shed request is answered (503 with Retry-After, at once up to a rate)
- front: the ASGI app gunicorn's uvicorn workers serve (bodies, admission, the access log)
- asgi: the plumbing from the front to the Flask app (a WSGI environ, a call in a thread, JSON answers)
"""
