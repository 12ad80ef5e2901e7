import { assert, describe, it } from "@effect/vitest"
import { Effect, Redacted } from "effect"
import { execFileSync } from "node:child_process"
import * as crypto from "node:crypto"
import * as fs from "node:fs"
import * as os from "node:os"
import * as path from "node:path"
import * as CryptConfig from "../src/CryptConfig.js"
import * as DataBlob from "../src/DataBlob.js"
import * as KeyConfig from "../src/KeyConfig.js"

const passphrase = Redacted.make("correct horse battery")

describe("KeyConfig", () => {
  for (const kdf of ["scrypt", "pbkdf2", "none"] as const) {
    it.effect(`writes and reads a key file with kdf ${kdf}`, () =>
      Effect.gen(function*() {
        const crypt = yield* CryptConfig.generate
        const config = yield* KeyConfig.create(crypt, { kdf, passphrase, created: 1717588800, hint: "the usual" })
        const json = KeyConfig.toJson(config)
        const parsed = JSON.parse(json)
        assert.deepStrictEqual(Object.keys(parsed), ["kdf", "created", "modified", "data", "fingerprint", "hint"])
        assert.strictEqual(parsed.fingerprint, crypt.fingerprint)
        if (kdf === "none") {
          assert.isNull(parsed.kdf)
          assert.strictEqual(Buffer.from(parsed.data, "base64").length, 32)
        } else {
          const params = kdf === "scrypt" ? parsed.kdf.Scrypt : parsed.kdf.PBKDF2
          assert.strictEqual(Buffer.from(params.salt, "base64").length, 32)
          if (kdf === "scrypt") assert.deepStrictEqual([params.n, params.r, params.p], [65536, 8, 1])
          else assert.strictEqual(params.iter, 65535)
          assert.strictEqual(Buffer.from(parsed.data, "base64").length, 64)
          assert.notInclude(json, Buffer.from(Redacted.value(crypt.rawKey)).toString("base64"))
        }
        const key = yield* KeyConfig.decrypt(yield* KeyConfig.parse(json), passphrase)
        assert.strictEqual(key.created, 1717588800)
        assert.strictEqual(key.fingerprint, crypt.fingerprint)
        const loaded = yield* KeyConfig.load(json, passphrase)
        assert.strictEqual(loaded.fingerprint, crypt.fingerprint)
      }))
  }

  it.effect("refuses a wrong passphrase, a short passphrase and a wrong fingerprint", () =>
    Effect.gen(function*() {
      const crypt = yield* CryptConfig.generate
      const config = yield* KeyConfig.create(crypt, { kdf: "pbkdf2", passphrase })
      const wrong = yield* Effect.flip(KeyConfig.decrypt(config, Redacted.make("incorrect horse")))
      assert.strictEqual(wrong.reason, "WrongPassphrase")
      assert.notInclude(wrong.message, "incorrect horse")
      const short = yield* Effect.flip(KeyConfig.create(crypt, { kdf: "scrypt", passphrase: Redacted.make("abcd") }))
      assert.strictEqual(short.reason, "ShortPassphrase")
      const missing = yield* Effect.flip(KeyConfig.decrypt(config))
      assert.strictEqual(missing.reason, "WrongPassphrase")
      const other = yield* CryptConfig.generate
      const lying = { ...config, fingerprint: other.fingerprint }
      assert.strictEqual((yield* Effect.flip(KeyConfig.decrypt(lying, passphrase))).reason, "FingerprintMismatch")
      assert.strictEqual((yield* Effect.flip(KeyConfig.parse("{\"kdf\": 1}"))).reason, "Parse")
    }))

  it.effect("formats times as RFC 3339 with an offset and reads them back", () =>
    Effect.gen(function*() {
      const text = KeyConfig.formatTime(1717588800)
      assert.match(text, /^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(Z|[+-]\d{2}:\d{2})$/)
      assert.strictEqual(Date.parse(text) / 1000, 1717588800)
      const key = yield* KeyConfig.decrypt({
        kdf: null,
        created: "2024-06-05T14:00:00+02:00",
        modified: "2024-06-05T14:00:00+02:00",
        data: Buffer.alloc(32, 3).toString("base64")
      })
      assert.strictEqual(key.created, 1717588800)
    }))

  it.effect("master-key blob: RSA PKCS#1 v1.5, plain uncompressed blob, recoverable (JS and openssl CLI)", () =>
    Effect.gen(function*() {
      const { privateKey, publicKey } = crypto.generateKeyPairSync("rsa", { modulusLength: 4096 })
      const privatePem = privateKey.export({ type: "pkcs8", format: "pem" }).toString()
      const publicPem = publicKey.export({ type: "spki", format: "pem" }).toString()
      const crypt = yield* CryptConfig.generate
      const blob = yield* KeyConfig.masterKeyBlob(crypt, { publicKeyPem: publicPem, created: 1717588800 })
      assert.strictEqual(blob.subarray(0, 8).toString("hex"), "42ab3807be8370a1")
      assert.strictEqual(blob.length, 12 + 512)
      const recovered = yield* KeyConfig.recoverFromMasterKeyBlob(blob, Redacted.make(privatePem))
      assert.isNull(recovered.kdf)
      assert.strictEqual(recovered.fingerprint, crypt.fingerprint)
      const key = yield* KeyConfig.decrypt(recovered)
      assert.strictEqual(key.created, 1717588800)
      assert.isTrue(Buffer.from(Redacted.value(key.rawKey)).equals(Buffer.from(Redacted.value(crypt.rawKey))))

      const dir = fs.mkdtempSync(path.join(os.tmpdir(), "pbs-rsa-"))
      try {
        fs.writeFileSync(path.join(dir, "key.pem"), privatePem)
        fs.writeFileSync(path.join(dir, "block.bin"), (yield* DataBlob.decode(blob)))
        const out = execFileSync("openssl", [
          "pkeyutl", "-decrypt", "-inkey", path.join(dir, "key.pem"),
          "-pkeyopt", "rsa_padding_mode:pkcs1", "-in", path.join(dir, "block.bin")
        ])
        const viaOpenssl = JSON.parse(out.toString())
        assert.strictEqual(viaOpenssl.fingerprint, crypt.fingerprint)
        assert.strictEqual(viaOpenssl.data, Buffer.from(Redacted.value(crypt.rawKey)).toString("base64"))
      } finally {
        fs.rmSync(dir, { recursive: true, force: true })
      }

      const { privateKey: otherKey } = crypto.generateKeyPairSync("rsa", { modulusLength: 4096 })
      const wrong = yield* Effect.flip(
        KeyConfig.recoverFromMasterKeyBlob(blob, Redacted.make(otherKey.export({ type: "pkcs8", format: "pem" }).toString()))
      )
      assert.strictEqual(wrong._tag, "KeyConfigError")
    }), { timeout: 30_000 })
})
