#!/usr/bin/env python3
"""Flower 1.42 + PyTorch baseline of the fastText federation, for bench/flower/compare.sh.

Runs Flower as a deployment would: one server process and one process per client, talking gRPC
over loopback (Flower's legacy `start_server` / `start_client`, grpc-bidi, *insecure*: no TLS).
Everything else mirrors our federation (bench/federation.sh):

  data       our CSV shards (text,label), one per client; test.csv for server-side evaluation
  tokenizer  the port of client/src/tokenizer.rs: words are lowercase runs of alphanumerics and
             apostrophes; unigrams then bigrams, words joined by one space, 64-bit FNV-1a mod buckets
  model      EmbeddingBag(buckets, dim, mean), uniform(-1/dim, 1/dim), then Linear(dim, classes)
             with PyTorch's default init
  training   1 local epoch, batch 32, Adam lr 0.01 (a new optimizer each round), shuffled each
             round, torch.set_num_threads(1) in each client
  strategy   FedAvg over all clients, weighted by example counts; centralized evaluation of the
             new global model on test.csv after each round (plus Flower's usual round 0)

Optimizers (--optimizer):
  adam-fused   (default) torch.optim.Adam(model.parameters(), lr, fused=True): plain dense Adam,
               as a PyTorch user writes it, in PyTorch's fastest CPU implementation (about 5x
               faster here than the default `foreach` one for this 4.2M-parameter table)
  adam         torch.optim.Adam(model.parameters(), lr): the same math, PyTorch's default kernel
  sparse-adam  what our client implements: EmbeddingBag(sparse=True) with SparseAdam (lazy,
               row-wise moments) for the table and Adam for the linear layer
With dense Adam every step updates the whole 65,536 x 64 table (rows not in the batch keep
moving on their momentum); with sparse Adam only the rows a batch touches change.

Usage:
  flower_fasttext.py run --data DIR [--clients 4] [--rounds 20] [--out DIR] [--optimizer adam-fused|adam|sparse-adam]
The `server` and `client` subcommands are what `run` starts.
"""

import argparse
import csv
import json
import os
import socket
import subprocess
import sys
import threading
import time

FNV_OFFSET = 0xCBF29CE484222325
FNV_PRIME = 0x100000001B3
MASK64 = (1 << 64) - 1
OPTIMIZERS = ["adam-fused", "adam", "sparse-adam"]


# ---------------------------------------------------------------- tokenizer (port of tokenizer.rs)

def fnv1a64(data: bytes) -> int:
    h = FNV_OFFSET
    for b in data:
        h = ((h ^ b) * FNV_PRIME) & MASK64
    return h


def words(text: str) -> list:
    """Lowercase runs of alphanumerics and apostrophes. Python's isalnum() and Rust's
    char::is_alphanumeric() agree on ASCII (all our generated data); they differ on a few
    Unicode combining marks, which the generator never writes."""
    out, cur = [], []
    for c in text:
        if c.isalnum() or c == "'":
            cur.append(c.lower())
        elif cur:
            out.append("".join(cur))
            cur = []
    if cur:
        out.append("".join(cur))
    return out


class Tokenizer:
    def __init__(self, buckets: int, ngrams: int = 2):
        self.buckets, self.ngrams, self.cache = buckets, ngrams, {}

    def ngram_id(self, gram: str) -> int:
        i = self.cache.get(gram)
        if i is None:
            i = self.cache[gram] = fnv1a64(gram.encode("utf-8")) % self.buckets
        return i

    def ids(self, text: str) -> list:
        w = words(text)
        out = []
        for n in range(1, self.ngrams + 1):
            out.extend(self.ngram_id(" ".join(w[i:i + n])) for i in range(len(w) - n + 1))
        return out


def self_test():
    # The pinned values of tokenizer.rs's hash_is_pinned test.
    assert fnv1a64(b"") == 0xCBF29CE484222325
    assert fnv1a64(b"a") == 0xAF63DC4C8601EC8C
    assert fnv1a64(b"foobar") == 0x85944171F73967E8
    t = Tokenizer(65536, 2)
    assert t.ids("a") == [0xEC8C] and t.ids("Foobar") == [0x67E8]
    assert t.ids("hello world") == [48395, 35571, 53991]
    assert words("Don't STOP, me-now 42x!") == ["don't", "stop", "me", "now", "42x"]
    assert words("Ünïcode Straße") == ["ünïcode", "straße"]


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return [r["text"] for r in rows], [r["label"].strip() for r in rows]


# ---------------------------------------------------------------- model

def build_model(buckets, dim, classes, sparse):
    import torch
    from torch import nn

    class FastText(nn.Module):
        def __init__(self):
            super().__init__()
            self.embedding = nn.EmbeddingBag(buckets, dim, mode="mean", sparse=sparse)
            nn.init.uniform_(self.embedding.weight, -1.0 / dim, 1.0 / dim)
            self.linear = nn.Linear(dim, classes)

        def forward(self, ids, offsets):
            return self.linear(self.embedding(ids, offsets))

    return FastText()


def encode(tok, texts, labels, label_list):
    import torch
    docs = [torch.tensor(tok.ids(t), dtype=torch.long) for t in texts]
    index = {l: i for i, l in enumerate(label_list)}
    return docs, torch.tensor([index[l] for l in labels], dtype=torch.long)


def collate(docs, idx):
    import torch
    parts = [docs[i] for i in idx]
    lengths = torch.tensor([len(p) for p in parts], dtype=torch.long)
    offsets = torch.zeros(len(parts), dtype=torch.long)
    offsets[1:] = torch.cumsum(lengths, 0)[:-1]
    return torch.cat(parts), offsets


def get_weights(model):
    return [p.detach().cpu().numpy() for p in model.state_dict().values()]


def set_weights(model, arrays):
    import torch
    with torch.no_grad():
        for p, a in zip(model.state_dict().values(), arrays):
            p.copy_(torch.from_numpy(a))


def evaluate(model, docs, labels):
    import torch
    import torch.nn.functional as F
    model.eval()
    correct, loss = 0, 0.0
    with torch.no_grad():
        for s in range(0, len(docs), 512):
            idx = range(s, min(s + 512, len(docs)))
            logits = model(*collate(docs, idx))
            y = labels[s:s + len(idx)]
            loss += F.cross_entropy(logits, y, reduction="sum").item()
            correct += (logits.argmax(-1) == y).sum().item()
    return correct / len(docs), loss / len(docs)


def train_round(model, docs, y, a, rnd):
    """One local round: a new optimizer, one shuffled epoch in batches. Returns (loss, accuracy)."""
    import torch
    import torch.nn.functional as F
    model.train()
    if a.optimizer == "sparse-adam":
        opts = [torch.optim.SparseAdam([model.embedding.weight], lr=a.lr),
                torch.optim.Adam(model.linear.parameters(), lr=a.lr)]
    else:
        opts = [torch.optim.Adam(model.parameters(), lr=a.lr, fused=a.optimizer == "adam-fused")]
    n = len(docs)
    g = torch.Generator().manual_seed(a.seed * 100_003 + rnd)
    perm = torch.randperm(n, generator=g).tolist()
    loss_sum, correct = 0.0, 0
    for s in range(0, n, a.batch_size):
        idx = perm[s:s + a.batch_size]
        target = y[idx]
        logits = model(*collate(docs, idx))
        loss = F.cross_entropy(logits, target)
        for o in opts:
            o.zero_grad()
        loss.backward()
        for o in opts:
            o.step()
        loss_sum += loss.item() * len(idx)
        correct += (logits.argmax(-1) == target).sum().item()
    return loss_sum / n, correct / n


# ---------------------------------------------------------------- client

def client_main(a):
    import torch
    import flwr as fl

    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    labels = a.labels.split(",")
    tok = Tokenizer(a.buckets, 2)
    texts, y = read_csv(a.data)
    docs, y = encode(tok, texts, y, labels)
    model = build_model(a.buckets, a.dim, len(labels), a.optimizer == "sparse-adam")
    print(f"data and model ready {time.time() - a.t0:.2f} s after launch", flush=True)

    class FastTextClient(fl.client.NumPyClient):
        def get_parameters(self, config):
            return get_weights(model)

        def fit(self, parameters, config):
            started = time.time()
            set_weights(model, parameters)
            rnd = int(config.get("round", 0))
            loss, acc = train_round(model, docs, y, a, rnd)
            train_s = time.time() - started
            print(f"round {rnd} trained {len(docs)} rows in {train_s:.3f} s, loss {loss:.4f}", flush=True)
            return get_weights(model), len(docs), {"loss": loss, "accuracy": acc, "train_s": train_s}

    # Wait until the server listens (as our clients wait for the coordinator), so that Flower's
    # exponential reconnect back-off never adds seconds to its figures.
    host, port = a.address.rsplit(":", 1)
    while True:
        try:
            socket.create_connection((host, int(port)), timeout=1).close()
            break
        except OSError:
            time.sleep(0.02)
    print(f"server reachable {time.time() - a.t0:.2f} s after launch", flush=True)
    fl.client.start_client(server_address=a.address, client=FastTextClient().to_client(), insecure=True)


# ---------------------------------------------------------------- server

def server_main(a):
    import torch
    import flwr as fl
    from flwr.common import ndarrays_to_parameters

    t0 = a.t0
    labels = a.labels.split(",")
    tok = Tokenizer(a.buckets, 2)
    texts, ys = read_csv(a.eval_data)
    docs, ys = encode(tok, texts, ys, labels)
    torch.manual_seed(0)
    model = build_model(a.buckets, a.dim, len(labels), False)
    metrics = open(a.metrics, "w")
    round_start = {}

    def evaluate_fn(server_round, parameters, config):
        set_weights(model, parameters)
        acc, loss = evaluate(model, docs, ys)
        now = time.time()
        line = {"round": server_round, "accuracy": acc, "loss": loss, "elapsed_s": now - t0,
                "round_s": now - round_start[server_round] if server_round in round_start else None}
        metrics.write(json.dumps(line) + "\n")
        metrics.flush()
        print(f"flower round {server_round} accuracy {acc:.4f} loss {loss:.4f} "
              f"elapsed_s {now - t0:.2f} round_s {line['round_s'] or 0:.2f}", flush=True)
        return loss, {"accuracy": acc}

    class TimedFedAvg(fl.server.strategy.FedAvg):
        def configure_fit(self, server_round, parameters, client_manager):
            round_start[server_round] = time.time()
            return super().configure_fit(server_round, parameters, client_manager)

        def aggregate_fit(self, server_round, results, failures):
            if failures:
                print(f"flower round {server_round}: {len(failures)} failures: {failures}", flush=True)
            return super().aggregate_fit(server_round, results, failures)

    strategy = TimedFedAvg(
        fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=a.clients,
        min_available_clients=a.clients, evaluate_fn=evaluate_fn,
        initial_parameters=ndarrays_to_parameters(get_weights(model)),
        on_fit_config_fn=lambda rnd: {"round": rnd})
    print(f"flower server starting {time.time() - t0:.2f} s after launch", flush=True)
    fl.server.start_server(server_address=a.address, strategy=strategy,
                           config=fl.server.ServerConfig(num_rounds=a.rounds, round_timeout=600))
    metrics.close()
    print(f"flower server stopped {time.time() - t0:.2f} s after launch", flush=True)


# ---------------------------------------------------------------- launcher

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_main(a):
    t0 = a.t0 or time.time()
    out = a.out or os.path.join(a.data, "flower")
    os.makedirs(out, exist_ok=True)
    _, test_labels = read_csv(os.path.join(a.data, "test.csv"))
    labels = ",".join(sorted(set(test_labels)))  # as the coordinator: the eval data's labels, sorted
    address = f"127.0.0.1:{free_port()}"
    me = [sys.executable, os.path.abspath(__file__)]
    # Flower's telemetry posts to a web service at start and exit (up to 60 s timeouts); an
    # offline deployment turns it off, and so do we, so that no blocked request is timed.
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    common = ["--address", address, "--labels", labels, "--buckets", str(a.buckets), "--dim", str(a.dim),
              "--t0", repr(t0)]
    metrics = os.path.join(out, "metrics.jsonl")
    server = subprocess.Popen(
        me + ["server", *common, "--rounds", str(a.rounds), "--clients", str(a.clients),
              "--eval-data", os.path.join(a.data, "test.csv"), "--metrics", metrics],
        stdout=subprocess.PIPE, stderr=open(os.path.join(out, "server.log"), "w"), text=True)
    clients = []
    for i in range(1, a.clients + 1):
        log = open(os.path.join(out, f"client-{i}.log"), "w")
        clients.append(subprocess.Popen(
            me + ["client", *common, "--data", os.path.join(a.data, f"shard-{i}.csv"), "--seed", str(i),
                  "--lr", str(a.lr), "--batch-size", str(a.batch_size), "--optimizer", a.optimizer],
            stdout=log, stderr=subprocess.STDOUT))
    def relay():
        for line in server.stdout:
            print(line, end="", flush=True)

    relay_thread = threading.Thread(target=relay, daemon=True)
    relay_thread.start()
    peak = 0
    while server.poll() is None:
        try:
            with open(f"/proc/{server.pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        peak = max(peak, int(line.split()[1]))
        except OSError:
            pass
        time.sleep(0.1)
    end = time.time()
    relay_thread.join(timeout=5)
    for c in clients:
        try:
            c.wait(timeout=10)
        except subprocess.TimeoutExpired:
            c.kill()
    rows = [json.loads(l) for l in open(metrics)] if os.path.exists(metrics) else []
    summary = {"wall_s": end - t0, "server_peak_rss_kib": peak, "server_rc": server.returncode,
               "rounds": [r for r in rows if r["round"] > 0], "round0": [r for r in rows if r["round"] == 0]}
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(f"flower wall time, launch to end: {end - t0:.1f} s; server peak RSS {peak / 1024:.1f} MiB", flush=True)
    if server.returncode != 0 or len(summary["rounds"]) < a.rounds:
        print(f"flower: server exited {server.returncode} after {len(summary['rounds'])} rounds; "
              f"see {out}/server.log", file=sys.stderr)
        sys.exit(1)


def sim_main(a):
    """The same rounds in one process without Flower (FedAvg by example counts, same seeds): a
    quick way to see the accuracy curve that a data setting gives; not a timing figure."""
    import torch
    torch.set_num_threads(a.threads)
    _, test_labels = read_csv(os.path.join(a.data, "test.csv"))
    labels = sorted(set(test_labels))
    tok = Tokenizer(a.buckets, 2)
    tdocs, ty = encode(tok, *read_csv(os.path.join(a.data, "test.csv")), labels)
    shards = []
    for i in range(1, a.clients + 1):
        shards.append(encode(tok, *read_csv(os.path.join(a.data, f"shard-{i}.csv")), labels))
    torch.manual_seed(0)
    server = build_model(a.buckets, a.dim, len(labels), False)
    local = build_model(a.buckets, a.dim, len(labels), a.optimizer == "sparse-adam")
    curve = []
    for rnd in range(1, a.rounds + 1):
        glob = [w.copy() for w in get_weights(server)]
        acc_sum = [0.0 * w for w in glob]
        total = 0
        for i, (docs, y) in enumerate(shards, start=1):
            set_weights(local, glob)
            a.seed = i
            train_round(local, docs, y, a, rnd)
            for s_, w in zip(acc_sum, get_weights(local)):
                s_ += w * len(docs)
            total += len(docs)
        set_weights(server, [s_ / total for s_ in acc_sum])
        acc, loss = evaluate(server, tdocs, ty)
        curve.append(acc)
        print(f"sim round {rnd} accuracy {acc:.4f} loss {loss:.4f}", flush=True)
    print("sim curve: " + " ".join(f"{c:.3f}" for c in curve))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="launch a server and CLIENTS clients; print accuracy per round")
    r.add_argument("--data", required=True, help="dir with shard-{1..N}.csv and test.csv")
    r.add_argument("--clients", type=int, default=4)
    r.add_argument("--rounds", type=int, default=20)
    r.add_argument("--out", help="logs, metrics.jsonl, summary.json (default DATA/flower)")
    r.add_argument("--t0", type=float, help="launch time (epoch seconds) to count from (default: now)")
    for q in (r, sub.add_parser("server"), sub.add_parser("client")):
        q.add_argument("--buckets", type=int, default=65536)
        q.add_argument("--dim", type=int, default=64)
        if q is not r:
            q.add_argument("--address", required=True)
            q.add_argument("--labels", required=True)
            q.add_argument("--t0", type=float, required=True)
        if q.prog.endswith("server"):
            q.add_argument("--rounds", type=int, required=True)
            q.add_argument("--clients", type=int, required=True)
            q.add_argument("--eval-data", required=True)
            q.add_argument("--metrics", required=True)
        else:
            q.add_argument("--lr", type=float, default=0.01)
            q.add_argument("--batch-size", type=int, default=32)
            q.add_argument("--optimizer", choices=OPTIMIZERS, default="adam-fused")
        if q.prog.endswith("client"):
            q.add_argument("--data", required=True)
            q.add_argument("--seed", type=int, required=True)
    m = sub.add_parser("sim", help="the same FedAvg rounds in one process, no Flower: accuracy curve only")
    m.add_argument("--data", required=True)
    m.add_argument("--clients", type=int, default=4)
    m.add_argument("--rounds", type=int, default=20)
    m.add_argument("--threads", type=int, default=1)
    m.add_argument("--buckets", type=int, default=65536)
    m.add_argument("--dim", type=int, default=64)
    m.add_argument("--lr", type=float, default=0.01)
    m.add_argument("--batch-size", type=int, default=32)
    m.add_argument("--optimizer", choices=OPTIMIZERS, default="adam-fused")
    sub.add_parser("self-test", help="check the tokenizer port against tokenizer.rs's pinned values")
    a = p.parse_args()
    if a.cmd == "self-test":
        self_test()
        print("tokenizer port: pinned values match")
        return
    self_test()
    {"run": run_main, "server": server_main, "client": client_main, "sim": sim_main}[a.cmd](a)


if __name__ == "__main__":
    main()
