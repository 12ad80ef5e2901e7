import { assert, describe, it } from "@effect/vitest"
import { Effect, Redacted } from "effect"
import * as CryptConfig from "../src/CryptConfig.js"
import * as DataBlob from "../src/DataBlob.js"
import * as FixedIndex from "../src/FixedIndex.js"

const hexOf = (b: Uint8Array) => Buffer.from(b).toString("hex")

describe("CryptConfig", () => {
  const data = Buffer.alloc(100_000)
  for (let i = 0; i < data.length; i++) data[i] = i % 255

  it.effect("§3.7 vector (blob_writer.rs): plain and keyed digests, id_key", () =>
    Effect.gen(function*() {
      const crypt = yield* CryptConfig.make(Redacted.make(new Uint8Array(32).fill(1)))
      assert.strictEqual(hexOf(DataBlob.chunkDigest(data)), "539a60c3a7cc268ecce082c9184702bc829bb106a2643dee26db3ff0bf8457ee")
      assert.strictEqual(
        hexOf(DataBlob.chunkDigest(data, crypt)),
        "32a2bf5dff84090e7f175c27f666f5cc8268046ab6efda0e501196bceffdc675"
      )
      assert.strictEqual(
        hexOf(CryptConfig.deriveIdKey(new Uint8Array(32).fill(1))),
        "421679d8d439d1cbf2a915904a91d1ba20b7e641f9c846378b899864189ff304"
      )
    }))

  it.effect("§3.7 vector (pbs-key-config): fingerprint of the key 00..1f", () =>
    Effect.gen(function*() {
      const key = Uint8Array.from({ length: 32 }, (_, i) => i)
      const crypt = yield* CryptConfig.make(Redacted.make(key))
      assert.strictEqual(
        crypt.fingerprint,
        "0e:ab:d4:46:0b:6e:b9:ca:34:50:23:de:e2:b7:78:c7:90:e5:4a:16:83:b9:65:9c:0a:57:ae:19:90:90:15:9b"
      )
      assert.strictEqual(crypt.keyId, "0e:ab:d4:46:0b:6e:b9:ca")
      assert.strictEqual(
        hexOf(CryptConfig.FINGERPRINT_INPUT),
        "6ed0ef77471fff4d55c7a8fe4a9db62161407f134c725ddf30992d25ec45ed26"
      )
    }))

  it.effect("§2.2: zero-chunk digests, plain and keyed", () =>
    Effect.gen(function*() {
      assert.strictEqual(hexOf(FixedIndex.zeroChunkDigest()), FixedIndex.ZERO_CHUNK_DIGEST_HEX)
      assert.strictEqual(hexOf(DataBlob.chunkDigest(Buffer.alloc(FixedIndex.CHUNK_SIZE))), FixedIndex.ZERO_CHUNK_DIGEST_HEX)
      const crypt = yield* CryptConfig.generate
      const keyed = FixedIndex.zeroChunkDigest(crypt)
      assert.strictEqual(hexOf(keyed), hexOf(crypt.computeDigest(Buffer.alloc(FixedIndex.CHUNK_SIZE))))
      assert.notStrictEqual(hexOf(keyed), FixedIndex.ZERO_CHUNK_DIGEST_HEX)
    }))

  it.effect("refuses keys that are not 32 bytes and never shows the key", () =>
    Effect.gen(function*() {
      const error = yield* Effect.flip(CryptConfig.make(Redacted.make(new Uint8Array(16))))
      assert.strictEqual(error.reason, "BadKey")
      const crypt = yield* CryptConfig.make(Redacted.make(new Uint8Array(32).fill(0xab)))
      assert.notInclude(JSON.stringify(crypt), "abab")
      assert.notInclude(String(crypt.rawKey), "171")
    }))
})
