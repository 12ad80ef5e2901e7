/**
 * @since 0.1.0
 */
export * as CryptConfig from "./CryptConfig.js"
/**
 * @since 0.1.0
 */
export * as DataBlob from "./DataBlob.js"
/**
 * @since 0.1.0
 */
export * as FixedIndex from "./FixedIndex.js"
/**
 * @since 0.1.0
 */
export * as KeyConfig from "./KeyConfig.js"
/**
 * @since 0.1.0
 */
export * as Manifest from "./Manifest.js"
/**
 * @since 0.1.0
 */
export * as PbsError from "./PbsError.js"
/**
 * @since 0.1.0
 */
export * as Snapshot from "./Snapshot.js"
/**
 * @since 0.1.0
 */
export * as PbsClient from "./PbsClient.js"
/**
 * @since 0.1.0
 */
export * as PbsRestore from "./PbsRestore.js"
/**
 * @since 0.1.0
 */
export * as PbsSnapshotWriter from "./PbsSnapshotWriter.js"
/**
 * @since 0.1.0
 */
export * as PbsTarget from "./PbsTarget.js"
/**
 * @since 0.1.0
 */
export * as PbsVmRestore from "./PbsVmRestore.js"
