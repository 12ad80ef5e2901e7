/**
 * @vzdump/target-vma: Proxmox VMA archives — streaming writer and reader, vzdump-style compression, and
 * the `vma` command line.
 *
 * @since 0.1.0
 */

/**
 * @since 0.1.0
 */
export * as VmaCli from "./VmaCli.js"

/**
 * @since 0.1.0
 */
export * as VmaCompression from "./VmaCompression.js"

/**
 * @since 0.1.0
 */
export * as VmaError from "./VmaError.js"

/**
 * @since 0.1.0
 */
export * as VmaInput from "./VmaInput.js"

/**
 * @since 0.1.0
 */
export * as VmaOutput from "./VmaOutput.js"

/**
 * @since 0.1.0
 */
export * as VmaReader from "./VmaReader.js"

/**
 * @since 0.1.0
 */
export * as VmaWriter from "./VmaWriter.js"
