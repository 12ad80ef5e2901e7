import { assert, describe, it } from "@effect/vitest"
import { Effect, Either, Redacted } from "effect"
import * as crypto from "node:crypto"
import * as CryptConfig from "../src/CryptConfig.js"
import * as DataBlob from "../src/DataBlob.js"
import * as Manifest from "../src/Manifest.js"

const vectorKey = Effect.promise(
  () =>
    new Promise<Buffer>((resolve, reject) =>
      crypto.scrypt("test", Buffer.alloc(0), 32, { N: 65536, r: 8, p: 1, maxmem: 256 * 2 ** 20 }, (e, k) =>
        e === null ? resolve(k) : reject(e)
      )
    )
)

const vectorManifest = Manifest.make({
  backupType: "host",
  backupId: "elsa",
  backupTime: 1593179765,
  files: [
    { filename: "test1.img.fidx", "crypt-mode": "encrypt", size: 200, csum: "01".repeat(32) },
    { filename: "abc.blob", "crypt-mode": "none", size: 200, csum: "02".repeat(32) }
  ],
  unprotected: { note: "This is not protected by the signature." }
})

describe("Manifest", () => {
  it.effect("§4.3 vector: canonical text and signature", () =>
    Effect.gen(function*() {
      const key = yield* vectorKey
      assert.strictEqual(key.toString("hex"), "28cdb1a3bef39396c3860e00d448fe7a0efd8244486ab6feb30457681d31597e")
      const crypt = yield* CryptConfig.make(Redacted.make(new Uint8Array(key)))
      const { signature: _s, unprotected: _u, ...signed } = Manifest.toJsonObject(vectorManifest)
      assert.strictEqual(
        Either.getOrThrow(Manifest.canonicalJson(signed)),
        `{"backup-id":"elsa","backup-time":1593179765,"backup-type":"host","files":[{"crypt-mode":"encrypt","csum":"0101010101010101010101010101010101010101010101010101010101010101","filename":"test1.img.fidx","size":200},{"crypt-mode":"none","csum":"0202020202020202020202020202020202020202020202020202020202020202","filename":"abc.blob","size":200}]}`
      )
      const signedManifest = yield* Manifest.sign(vectorManifest, crypt)
      assert.strictEqual(signedManifest.signature, "d7b446fb7db081662081d4b40fedd858a1d6307a5aff4ecff7d5bf4fd35679e9")
      assert.strictEqual(signedManifest.unprotected["key-fingerprint"], crypt.fingerprint)
      yield* Manifest.verifySignature(signedManifest, crypt)
      const changedNote = { ...signedManifest, unprotected: { ...signedManifest.unprotected, note: "changed" } }
      yield* Manifest.verifySignature(changedNote, crypt)
    }))

  it.effect("rejects a tampered manifest, a missing signature and another key", () =>
    Effect.gen(function*() {
      const crypt = yield* CryptConfig.generate
      const other = yield* CryptConfig.generate
      const signed = yield* Manifest.sign(vectorManifest, crypt)
      const tampered = { ...signed, "backup-time": signed["backup-time"] + 1 }
      assert.strictEqual((yield* Effect.flip(Manifest.verifySignature(tampered, crypt))).reason, "SignatureMismatch")
      assert.strictEqual((yield* Effect.flip(Manifest.verifySignature(vectorManifest, crypt))).reason, "MissingSignature")
      assert.strictEqual((yield* Effect.flip(Manifest.verifySignature(signed, other))).reason, "FingerprintMismatch")
      const noFingerprint = { ...signed, unprotected: {} }
      assert.strictEqual((yield* Effect.flip(Manifest.verifySignature(noFingerprint, other))).reason, "SignatureMismatch")
    }))

  it("canonical JSON sorts keys by bytes and refuses null", () => {
    assert.strictEqual(
      Either.getOrThrow(Manifest.canonicalJson({ b: [1, true, "x\n\"y"], a: { d: 1, c: 2 }, B: 0 })),
      `{"B":0,"a":{"c":2,"d":1},"b":[1,true,"x\\n\\"y"]}`
    )
    const nullError = Manifest.canonicalJson({ a: [1, null] })
    assert.isTrue(Either.isLeft(nullError) && nullError.left.reason === "Canonical")
  })

  it.effect("blob round trip: compressed, never encrypted; parse defaults and drops unknown fields", () =>
    Effect.gen(function*() {
      const crypt = yield* CryptConfig.generate
      const signed = yield* Manifest.sign(vectorManifest, crypt)
      const blob = yield* Manifest.encodeBlob(signed)
      assert.strictEqual(Either.getOrThrow(DataBlob.kindOf(blob)), "compressed")
      const back = yield* Manifest.decodeBlob(blob, crypt)
      assert.deepStrictEqual(back, signed)
      const minimal = yield* Manifest.parseJson(
        JSON.stringify({
          "backup-type": "vm",
          "backup-id": "100",
          "backup-time": 5,
          files: [{ filename: "a.blob", size: 1, csum: "ab".repeat(32) }],
          extra: 1
        })
      )
      assert.strictEqual(minimal.files[0]!["crypt-mode"], "none")
      assert.deepStrictEqual(minimal.unprotected, {})
      assert.strictEqual(minimal.signature, null)
      assert.isFalse("extra" in minimal)
    }))

  it.effect("refuses what the server's parser refuses", () =>
    Effect.gen(function*() {
      const base = { "backup-type": "vm", "backup-id": "100", "backup-time": 5 }
      const badCsum = yield* Effect.flip(
        Manifest.parseJson(JSON.stringify({ ...base, files: [{ filename: "a.blob", size: 1, csum: "" }] }))
      )
      assert.strictEqual(badCsum.reason, "Parse")
      const badType = yield* Effect.flip(Manifest.parseJson(JSON.stringify({ ...base, "backup-type": "lxc", files: [] })))
      assert.strictEqual(badType.reason, "Parse")
      assert.strictEqual((yield* Effect.flip(Manifest.parseJson("{"))).reason, "Parse")
    }))

  it("checks a file's size and csum against its entry", () => {
    const csum = Buffer.alloc(32, 1)
    assert.isTrue(Either.isRight(Manifest.checkFile(vectorManifest, "test1.img.fidx", { size: 200, csum })))
    const size = Manifest.checkFile(vectorManifest, "test1.img.fidx", { size: 201, csum })
    assert.isTrue(Either.isLeft(size) && size.left.reason === "FileMismatch")
    const sum = Manifest.checkFile(vectorManifest, "test1.img.fidx", { size: 200, csum: Buffer.alloc(32, 2) })
    assert.isTrue(Either.isLeft(sum) && sum.left.reason === "FileMismatch")
    const missing = Manifest.checkFile(vectorManifest, "nope.blob", { size: 200, csum })
    assert.isTrue(Either.isLeft(missing) && missing.left.reason === "FileMissing")
  })
})
