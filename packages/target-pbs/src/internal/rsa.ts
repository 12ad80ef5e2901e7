/**
 * RSA PKCS#1 v1.5 decryption in JavaScript (BigInt), for recovering a key from
 * `rsa-encrypted.key.blob`: Node 20 refuses `privateDecrypt` with PKCS#1 padding (CVE-2023-46809
 * hardening). This runs offline on data the user owns; it is not constant-time.
 */
import * as crypto from "node:crypto"

const fromBase64Url = (value: string): bigint => {
  const hex = Buffer.from(value, "base64url").toString("hex")
  return hex.length === 0 ? 0n : BigInt(`0x${hex}`)
}

const modPow = (base: bigint, exponent: bigint, modulus: bigint): bigint => {
  let result = 1n
  let b = base % modulus
  let e = exponent
  while (e > 0n) {
    if ((e & 1n) === 1n) result = (result * b) % modulus
    b = (b * b) % modulus
    e >>= 1n
  }
  return result
}

const toBytes = (value: bigint, length: number): Buffer => {
  const hex = value.toString(16).padStart(length * 2, "0")
  return Buffer.from(hex, "hex")
}

/** The message, or a reason why the block does not decrypt. */
export type RsaResult =
  | { readonly _tag: "Ok"; readonly data: Buffer }
  | { readonly _tag: "Error"; readonly detail: string }

/** Decrypts one PKCS#1 v1.5 block with a PEM private key. */
export const privateDecryptPkcs1 = (privateKeyPem: string, block: Uint8Array): RsaResult => {
  let jwk: crypto.JsonWebKey
  try {
    const key = crypto.createPrivateKey(privateKeyPem)
    if (key.asymmetricKeyType !== "rsa") return { _tag: "Error", detail: "not an RSA private key" }
    jwk = key.export({ format: "jwk" })
  } catch (cause) {
    const why = cause instanceof Error ? cause.message : String(cause)
    return { _tag: "Error", detail: `cannot read private key: ${why}` }
  }
  if (jwk.n === undefined || jwk.d === undefined || jwk.p === undefined || jwk.q === undefined) {
    return { _tag: "Error", detail: "incomplete RSA private key" }
  }
  const n = fromBase64Url(jwk.n)
  const k = Buffer.from(jwk.n, "base64url").length
  if (block.length !== k) return { _tag: "Error", detail: `block has ${block.length} bytes, modulus ${k}` }
  const c = BigInt(`0x${Buffer.from(block).toString("hex")}`)
  if (c >= n) return { _tag: "Error", detail: "ciphertext out of range" }
  const p = fromBase64Url(jwk.p)
  const q = fromBase64Url(jwk.q)
  const dp = fromBase64Url(jwk.dp ?? "")
  const dq = fromBase64Url(jwk.dq ?? "")
  const qi = fromBase64Url(jwk.qi ?? "")
  let m: bigint
  if (dp > 0n && dq > 0n && qi > 0n) {
    const m1 = modPow(c, dp, p)
    const m2 = modPow(c, dq, q)
    const h = (qi * (((m1 - m2) % p) + p)) % p
    m = m2 + h * q
  } else {
    m = modPow(c, fromBase64Url(jwk.d), n)
  }
  const em = toBytes(m, k)
  if (em[0] !== 0 || em[1] !== 2) return { _tag: "Error", detail: "decryption error (bad padding)" }
  const separator = em.indexOf(0, 2)
  if (separator < 10) return { _tag: "Error", detail: "decryption error (bad padding)" }
  return { _tag: "Ok", data: em.subarray(separator + 1) }
}
