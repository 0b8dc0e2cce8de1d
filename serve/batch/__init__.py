"""Offline batch transform (`python -m serve batch`), through the same engine and record path as the
server's JSON Lines route; the HTTP server never imports this package.

    cli.py       arguments, engine start, the job, exit status
    runner.py    the pipeline: feeder, workers, journal writer, finalizer threads
    records.py   one input line -> one output line (seeds, join-input, stable ids)
    journal.py   fsync'd append-only journal of finished records (resume after a kill)
    progress.py  tqdm bar on a terminal, log lines otherwise
    fileio.py    input discovery, line splitting, atomic outputs, local or S3
    s3io.py      S3 listing, streaming reads, multipart upload (boto3)
"""


def main(argv: list[str] | None = None) -> int:
    from serve.batch.cli import main as cli_main  # here: importing a submodule must not load them all

    return cli_main(argv)
