"""`armodal serve`: an OpenAI-compatible HTTP server over a continuous-batching engine.

    settings.py   ServerSettings: bind address, API key, queue and request limits
    requests.py   GenerationRequest in; TokenOut events and one Finished out
    engine.py     Engine: one thread owns the model; requests join and leave the decode batch
                  at step boundaries, each row with its own decoding settings and seed
    slots.py      BatchCache: one KV cache shared by rows that join and leave
    choose.py     choose_tokens: one step's tokens for rows with different settings
    api.py        the OpenAI completions request: validation, errors, DecodingConfig mapping
    completions.py  POST /v1/completions: plan, submit, answer or stream
    app.py        create_app(run, settings): the FastAPI routes, auth, errors, logs
    server.py     uvicorn with a shutdown that drains the engine; serve() for the CLI

Imports stay per module (`from armodal.serve.app import create_app`), so importing the
settings does not pull in FastAPI or torch.
"""
