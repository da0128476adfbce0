#!/usr/bin/env python3
"""Print N distinct valid caller JWTs (HS256) for the benchmark's team.

What `toastgate mint-token` does, without N process starts: the claims of
bench/toastgate.yaml (iss toastgate-bench, aud toastgate, team bench), a
distinct `sub` per token, valid for two hours. The secret is read from the
file as toastgate reads a `*_file` secret (trailing newline dropped).

Usage: mint_many.py SECRET_FILE N > jwts.txt
"""

import base64
import hashlib
import hmac
import json
import sys
import time


def b64(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def main():
    secret_file, count = sys.argv[1], int(sys.argv[2])
    secret = open(secret_file).read().rstrip("\r\n").encode()
    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}, separators=(",", ":")).encode())
    now = int(time.time())
    for i in range(count):
        claims = {"iss": "toastgate-bench", "aud": "toastgate", "team": "bench",
                  "sub": f"user-{i}", "iat": now, "exp": now + 7200}
        body = b64(json.dumps(claims, separators=(",", ":")).encode())
        signing_input = f"{head}.{body}".encode()
        sig = b64(hmac.new(secret, signing_input, hashlib.sha256).digest())
        print(f"{head}.{body}.{sig}")


if __name__ == "__main__":
    main()
