"""Several HTTP processes in front of one engine process (``FRONTENDS=N``).

One interpreter runs out before a GPU does: reading bodies, splitting forms, decoding and answering
share one interpreter lock. With ``FRONTENDS=N`` the process started as ``python -m app`` is the
*engine*: it loads the models and owns the batchers, the steppers and the device. It binds the port
and starts N *front ends* (``app.frontends.supervisor``), which share the listening socket and do
the HTTP work: they read and check requests, decode uploads on their own threads, and hand the
decoded clips to the engine through shared memory (``app.frontends.arena``): the pixels are written
once, into memory the engine maps, and never pickled. The engine queues them with every other
front end's clips, so one batch takes clips from every process, and sends back probabilities
(``app.frontends.port`` on the engine's side, ``app.frontends.link`` on a front end's; the messages
in ``app.frontends.wire``). Every other route (streams, timelines, explanations, metadata,
``/metrics``) is passed through to the engine's own HTTP server on a Unix socket.
"""
