import { assert, describe, it } from "@effect/vitest"
import { Effect, Either, Redacted } from "effect"
import * as crypto from "node:crypto"
import * as zstd from "zstd-napi"
import * as CryptConfig from "../src/CryptConfig.js"
import * as DataBlob from "../src/DataBlob.js"
import * as Blob from "../src/internal/blob.js"
import * as Zstd from "../src/internal/zstd.js"

const hex = (s: string) => Buffer.from(s.replace(/\s+/g, ""), "hex")
const key01 = Redacted.make(new Uint8Array(32).fill(1))
const text = Buffer.from("Proxmox Backup test data\n")
const iv = hex("000102030405060708090a0b0c0d0e0f")

describe("DataBlob", () => {
  it("magic numbers match the table of spec §1.1", () => {
    assert.strictEqual(DataBlob.Magic.uncompressed.toString("hex"), "42ab3807be8370a1")
    assert.strictEqual(DataBlob.Magic.compressed.toString("hex"), "31b958426fb6a37f")
    assert.strictEqual(DataBlob.Magic.encrypted.toString("hex"), "7b6785be222d4cf0")
    assert.strictEqual(DataBlob.Magic.encryptedCompressed.toString("hex"), "e6591bbf0bbfd80b")
  })

  it.effect("§1.5 vector: encrypted, uncompressed blob", () =>
    Effect.gen(function*() {
      const crypt = yield* CryptConfig.make(key01)
      const expected = hex(`7b6785be222d4cf0 627752e5 000102030405060708090a0b0c0d0e0f
        aabbb60ff79c32dd143563cd02c6e831 794dd5322eafeb21ebdf4151dedc36f5d4c0c16c69f54bcabe`)
      const blob = yield* DataBlob.encode(text, { crypt, iv, compress: true })
      assert.strictEqual(blob.length, 69)
      assert.strictEqual(blob.toString("hex"), expected.toString("hex"))
      assert.strictEqual(DataBlob.storedCrc(blob), 0xe5527762)
      const back = yield* DataBlob.decode(expected, { crypt })
      assert.strictEqual(back.toString(), text.toString())
    }))

  it.effect("§1.5 vector: plain, uncompressed blob", () =>
    Effect.gen(function*() {
      const blob = yield* DataBlob.encode(text)
      assert.strictEqual(blob.length, 37)
      assert.strictEqual(
        blob.toString("hex"),
        "42ab3807be8370a1" + "6173b69c" + "50726f786d6f78204261636b7570207465737420646174610a"
      )
      assert.strictEqual(DataBlob.storedCrc(blob), 0x9cb67361)
    }))

  it.effect("round-trips all four kinds and picks the kind by usefulness of compression", () =>
    Effect.gen(function*() {
      const crypt = yield* CryptConfig.generate
      const compressible = Buffer.alloc(200_000, "vzdump ")
      const random = crypto.randomBytes(50_000)
      const cases = [
        { data: random, crypt: undefined, kind: "uncompressed" },
        { data: compressible, crypt: undefined, kind: "compressed" },
        { data: random, crypt, kind: "encrypted" },
        { data: compressible, crypt, kind: "encrypted-compressed" }
      ] as const
      for (const c of cases) {
        const blob = yield* DataBlob.encode(c.data, { crypt: c.crypt })
        assert.strictEqual(Either.getOrThrow(DataBlob.kindOf(blob)), c.kind)
        const digest = DataBlob.chunkDigest(c.data, c.crypt)
        const back = yield* DataBlob.decode(blob, { crypt: c.crypt, digest, expectedLength: c.data.length })
        assert.isTrue(back.equals(c.data))
      }
      const uncompressed = yield* DataBlob.encode(compressible, { compress: false })
      assert.strictEqual(Either.getOrThrow(DataBlob.kindOf(uncompressed)), "uncompressed")
    }))

  it.effect("rejects a CRC mismatch, a bad magic and a short blob", () =>
    Effect.gen(function*() {
      const blob = yield* DataBlob.encode(Buffer.alloc(1000, 7))
      const damaged = Buffer.from(blob)
      damaged[damaged.length - 1]! ^= 0xff
      const crc = yield* Effect.flip(DataBlob.decode(damaged))
      assert.strictEqual(crc.reason, "CrcMismatch")
      assert.strictEqual(crc.message, "data blob: Data blob has wrong CRC checksum.")
      const magic = Buffer.from(blob)
      magic[0] = 0
      assert.strictEqual((yield* Effect.flip(DataBlob.decode(magic))).reason, "BadMagic")
      assert.strictEqual((yield* Effect.flip(DataBlob.decode(blob.subarray(0, 11)))).reason, "TooSmall")
      const encryptedHeaderOnly = Buffer.concat([DataBlob.Magic.encrypted, Buffer.alloc(20)])
      assert.strictEqual((yield* Effect.flip(DataBlob.decode(encryptedHeaderOnly))).reason, "TooSmall")
    }))

  it.effect("rejects a wrong key, a missing key and tampered ciphertext with a correct CRC", () =>
    Effect.gen(function*() {
      const crypt = yield* CryptConfig.generate
      const other = yield* CryptConfig.generate
      const blob = yield* DataBlob.encode(Buffer.from("secret payload"), { crypt })
      assert.strictEqual((yield* Effect.flip(DataBlob.decode(blob, { crypt: other }))).reason, "WrongKey")
      assert.strictEqual((yield* Effect.flip(DataBlob.decode(blob))).reason, "MissingKey")
      const tampered = Buffer.from(blob)
      tampered[50]! ^= 1
      DataBlob.fixCrc(tampered, "encrypted")
      assert.strictEqual((yield* Effect.flip(DataBlob.decode(tampered, { crypt }))).reason, "WrongKey")
    }))

  it.effect("checks the digest and the length, and bounds decompression", () =>
    Effect.gen(function*() {
      const data = Buffer.alloc(1 << 20)
      const blob = yield* DataBlob.encode(data)
      const wrongDigest = yield* Effect.flip(DataBlob.decode(blob, { digest: new Uint8Array(32) }))
      assert.strictEqual(wrongDigest.reason, "DigestMismatch")
      const wrongLength = yield* Effect.flip(DataBlob.decode(blob, { expectedLength: 4096 }))
      assert.strictEqual(wrongLength.reason, "LengthMismatch")
      const tooLarge = yield* Effect.flip(DataBlob.decode(blob, { maxSize: 1000 }))
      assert.strictEqual(tooLarge.reason, "TooLarge")
      const garbage = Buffer.concat([DataBlob.Magic.compressed, Buffer.alloc(4), Buffer.from("not a zstd frame")])
      DataBlob.fixCrc(garbage, "compressed")
      assert.strictEqual((yield* Effect.flip(DataBlob.decode(garbage))).reason, "Decompress")
    }))

  it("compresses with one reused zstd context exactly as a fresh level-1 compressor; no copies of raw chunks", () => {
    const chunk = 4 * 1024 * 1024
    const random = crypto.randomBytes(chunk)
    const text = Buffer.alloc(chunk, "vzdump-ts writes PBS chunks ")
    const mixed = Buffer.concat([random.subarray(0, chunk / 2), text.subarray(0, chunk / 2)])
    const small = Buffer.from("memory: 512\nscsi0: local:100/vm-100-disk-0.raw\n")
    const scratch = Buffer.alloc(Zstd.compressBound(chunk))
    // the context is reused across inputs of all kinds and sizes, in an order that changes its state
    for (const data of [text, random, small, mixed, text, small, random, mixed]) {
      const fresh = zstd.compress(data, { compressionLevel: 1 })
      const parts = Either.getOrThrow(Blob.encodeParts(data, { scratch }))
      const blob = Either.getOrThrow(DataBlob.encodeSync(data))
      assert.isTrue(blob.equals(Blob.join(parts)), "the joined parts are the blob")
      if (fresh.length < data.length) {
        assert.strictEqual(Either.getOrThrow(DataBlob.kindOf(blob)), "compressed")
        assert.isTrue(Buffer.from(parts.payload).equals(fresh), "same frame as a fresh compressor")
        assert.isTrue(parts.usesScratch)
        assert.strictEqual(parts.payload.buffer, scratch.buffer, "the frame is in the lent buffer")
      } else {
        assert.strictEqual(Either.getOrThrow(DataBlob.kindOf(blob)), "uncompressed")
        assert.strictEqual(parts.payload, data, "stored uncompressed: the input itself, not a copy")
        assert.isFalse(parts.usesScratch)
      }
      assert.strictEqual(DataBlob.storedCrc(blob), DataBlob.computeCrc(blob, "uncompressed"))
      assert.isTrue(Either.getOrThrow(DataBlob.decodeSync(blob)).equals(data))
    }
    // an uncompressed blob decodes to a copy (the view is only internal)
    const blob = Either.getOrThrow(DataBlob.encodeSync(random))
    const back = Either.getOrThrow(DataBlob.decodeSync(blob))
    blob.fill(0)
    assert.isTrue(back.equals(random))
  })

  it.effect("refuses to encode more than 128 MiB", () =>
    Effect.gen(function*() {
      const error = yield* Effect.flip(DataBlob.encode(Buffer.alloc(DataBlob.MAX_BLOB_SIZE + 1), { compress: false }))
      assert.strictEqual(error.reason, "TooLarge")
    }))
})
