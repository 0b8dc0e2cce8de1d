"""Entry points: `python -m serve serve [--host H] [--port P]`, `python -m serve batch ...` and
`python -m serve sign MODEL_DIR --key KEY ...` (serve/sign.py).

`serve` runs gunicorn in this process (so SIGTERM from `docker stop` / SageMaker reaches the gunicorn
master directly) with serve/gunicorn_conf.py; the configuration is validated first so a bad
environment variable fails at once with a message naming it.
"""

from __future__ import annotations

import argparse
import sys

USAGE = ("usage: python -m serve {serve [--host HOST] [--port PORT] | batch --input IN --output OUT ... "
         "| sign MODEL_DIR --key KEY ...}")


def serve(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m serve serve", description="Run the HTTP server (gunicorn).")
    parser.add_argument("--host", help="address to bind (default: HOST, else 0.0.0.0)")
    parser.add_argument("--port", type=int, help="port (default: SAGEMAKER_BIND_TO_PORT, else PORT, else 8080)")
    args = parser.parse_args(argv)
    from serve.config import ConfigError, load_config, prepare_adapter_registry, prepare_metrics_dir

    try:
        cfg = load_config()
    except ConfigError as e:
        print(f"serve: configuration error: {e}", file=sys.stderr)
        return 2
    prepare_metrics_dir(cfg)  # the workers inherit it: one /metrics scrape covers all of them
    prepare_adapter_registry(cfg)  # likewise: a registration on one worker reaches every worker (serve/adapters.py)
    from gunicorn.app.wsgiapp import WSGIApplication

    gunicorn_argv = ["gunicorn", "-c", "python:serve.gunicorn_conf"]
    if args.host or args.port:
        host, port = args.host or cfg.server.host, args.port or cfg.server.port
        gunicorn_argv += ["-b", f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    sys.argv = [*gunicorn_argv, "serve.app:create_app()"]
    WSGIApplication("%(prog)s [OPTIONS] [APP_MODULE]", prog="gunicorn").run()
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "serve":
        return serve(rest)
    if command == "batch":
        from serve.batch import main as batch_main  # lazily: the server never imports the batch code

        return batch_main(rest)
    if command == "sign":
        from serve.sign import main as sign_main

        return sign_main(rest)
    print(f"unknown command {command!r}\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
