#!/bin/sh
# Makes a throw-away PKI for the nginx interop tests (tests/interop_tls.rs runs this
# at test time into a temp dir), for the checked-in test certificates (tests/certs/gen.sh
# runs it into tests/certs), and for trying examples/wscat.rs by hand:
#
#   sh tests/peers/gen_certs.sh OUTDIR
#
# OUTDIR/ca.pem                  test CA (trust this one)
# OUTDIR/server.{pem,key}        signed by ca, SAN localhost, 127.0.0.1, ::1
# OUTDIR/wrong-host.{pem,key}    signed by ca, SAN wrong.example only
# OUTDIR/expired.{pem,key}       signed by ca, same SAN as server, valid 2000-2001 only
# OUTDIR/other-ca.pem            an unrelated CA
# OUTDIR/other-server.{pem,key}  same SAN as server, signed by other-ca ("unknown CA")
# OUTDIR/client.{pem,key}        client certificate (clientAuth) signed by ca, for mTLS
# OUTDIR/other-client.{pem,key}  client certificate signed by other-ca
#
# Keys are P-256 in PKCS#8 PEM (loadable by native_tls::Identity::from_pkcs8). Needs
# the openssl CLI (3.0 has no `x509 -not_before`, so dates go through `openssl ca`).
set -eu
OUT=${1:?usage: gen_certs.sh OUTDIR}
mkdir -p "$OUT"
cd "$OUT"
W=$(pwd)/.ca
mkdir -p "$W"
export W
cat > "$W/ca.cnf" <<'CNF'
[ ca ]
default_ca = tca
[ tca ]
database = $ENV::W/index.txt
serial = $ENV::W/serial
new_certs_dir = $ENV::W
default_md = sha256
policy = pol
copy_extensions = none
unique_subject = no
[ pol ]
commonName = supplied
[ req ]
distinguished_name = dn
[ dn ]
[ v3_ca ]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
[ server ]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = serverAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
subjectAltName = DNS:localhost,IP:127.0.0.1,IP:::1
[ wrong_host ]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = serverAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
subjectAltName = DNS:wrong.example
[ client ]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
CNF
: > "$W/index.txt"
echo 1000 > "$W/serial"

# Fixed dates, so nothing depends on the clock: valid 2020-01-01 .. 2120-01-01.
START=20200101000000Z
END=21200101000000Z

# cert NAME CN EXT_SECTION ISSUER(-|ca-name) START END
cert() {
  openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1.key" 2>/dev/null
  openssl req -new -config "$W/ca.cnf" -key "$1.key" -subj "/CN=$2" -out "$W/$1.csr"
  if [ "$4" = - ]; then
    openssl ca -batch -config "$W/ca.cnf" -selfsign -keyfile "$1.key" -in "$W/$1.csr" \
      -extensions "$3" -startdate "$5" -enddate "$6" -notext -out "$1.pem" 2>/dev/null
  else
    openssl ca -batch -config "$W/ca.cnf" -cert "$4.pem" -keyfile "$4.key" -in "$W/$1.csr" \
      -extensions "$3" -startdate "$5" -enddate "$6" -notext -out "$1.pem" 2>/dev/null
  fi
}

cert ca           "wsbeat interop CA"      v3_ca      -        $START $END
cert other-ca     "wsbeat unrelated CA"    v3_ca      -        $START $END
cert server       localhost                server     ca       $START $END
cert other-server localhost                server     other-ca $START $END
cert wrong-host   wrong.example            wrong_host ca       $START $END
cert expired      localhost                server     ca       20000101000000Z 20010101000000Z
cert client       "wsbeat interop client"  client     ca       $START $END
cert other-client "wsbeat unknown client"  client     other-ca $START $END
rm -rf "$W"
