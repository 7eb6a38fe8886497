#!/bin/sh
# Regenerates the test-only TLS files (CA + localhost/127.0.0.1 server cert, P-256, 20 years).
set -e
out=$(cd "$(dirname "$0")" && pwd)
dir=$(mktemp -d)
cd "$dir"
printf 'cn = "cfqt origin test CA"\nca\ncert_signing_key\nexpiration_days = 7300\n' > ca.tmpl
printf 'cn = "localhost"\ndns_name = "localhost"\nip_address = "127.0.0.1"\ntls_www_server\nencryption_key\nsigning_key\nexpiration_days = 7300\n' > server.tmpl
certtool --generate-privkey --key-type=ecdsa --curve=secp256r1 --outfile ca-key.pem
certtool --generate-self-signed --load-privkey ca-key.pem --template ca.tmpl --outfile ca.pem
certtool --generate-privkey --key-type=ecdsa --curve=secp256r1 --outfile server-key.pem
certtool --generate-certificate --load-privkey server-key.pem --load-ca-certificate ca.pem \
    --load-ca-privkey ca-key.pem --template server.tmpl --outfile server.pem
cp ca.pem "$out/tls-ca.pem"
cp server.pem "$out/tls-server.pem"
cp server-key.pem "$out/tls-server-key.pem"
rm -rf "$dir"
