import { assert, describe, it } from "@effect/vitest"
import { Effect, Either } from "effect"
import * as crypto from "node:crypto"
import * as FixedIndex from "../src/FixedIndex.js"

describe("FixedIndex", () => {
  it("has the magic of spec §1.1 and the 4 MiB chunk size", () => {
    assert.strictEqual(Buffer.from(FixedIndex.MAGIC).toString("hex"), "2f7f41ed91fd0fcd")
    assert.strictEqual(FixedIndex.CHUNK_SIZE, 4194304)
  })

  it.effect("encodes the header layout of §2.1 and decodes it back", () =>
    Effect.gen(function*() {
      const size = 2 * FixedIndex.CHUNK_SIZE + 12345
      const digests = crypto.randomBytes(3 * 32)
      const uuid = crypto.randomBytes(16)
      const bytes = Either.getOrThrow(FixedIndex.encode({ size, digests, ctime: 1717588800, uuid }))
      assert.strictEqual(bytes.length, 4096 + 3 * 32)
      assert.strictEqual(bytes.subarray(0, 8).toString("hex"), "2f7f41ed91fd0fcd")
      assert.isTrue(bytes.subarray(8, 24).equals(uuid))
      assert.strictEqual(bytes.readBigInt64LE(24), 1717588800n)
      assert.isTrue(bytes.subarray(32, 64).equals(crypto.createHash("sha256").update(digests).digest()))
      assert.strictEqual(bytes.readBigUInt64LE(64), BigInt(size))
      assert.strictEqual(bytes.readBigUInt64LE(72), 4194304n)
      assert.isTrue(bytes.subarray(80, 4096).equals(Buffer.alloc(4016)))
      const index = yield* FixedIndex.decode(bytes)
      assert.strictEqual(index.size, size)
      assert.strictEqual(index.ctime, 1717588800)
      assert.strictEqual(FixedIndex.chunkCount(index.size), 3)
      assert.strictEqual(FixedIndex.chunkLength(size, 2), 12345)
      assert.isTrue(Buffer.from(FixedIndex.digestAt(index, 1)).equals(digests.subarray(32, 64)))
      assert.isTrue(Buffer.from(FixedIndex.csum(index)).equals(Buffer.from(index.headerCsum)))
    }))

  it.effect("refuses a wrong magic, a wrong length and a zero chunk size", () =>
    Effect.gen(function*() {
      const bytes = Either.getOrThrow(FixedIndex.encode({ size: 10, digests: Buffer.alloc(32) }))
      const badMagic = Buffer.from(bytes)
      badMagic[3] = 0
      assert.strictEqual((yield* Effect.flip(FixedIndex.decode(badMagic))).reason, "BadMagic")
      assert.strictEqual((yield* Effect.flip(FixedIndex.decode(bytes.subarray(0, 4096 + 31)))).reason, "BadLength")
      assert.strictEqual(
        (yield* Effect.flip(FixedIndex.decode(Buffer.concat([bytes, Buffer.alloc(32)])))).reason,
        "BadLength"
      )
      const zeroChunk = Buffer.from(bytes)
      zeroChunk.writeBigUInt64LE(0n, 72)
      assert.strictEqual((yield* Effect.flip(FixedIndex.decode(zeroChunk))).reason, "BadHeader")
      assert.isTrue(Either.isLeft(FixedIndex.encode({ size: FixedIndex.CHUNK_SIZE + 1, digests: Buffer.alloc(32) })))
    }))
})
