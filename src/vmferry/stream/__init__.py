"""vmferry.stream: the migration wire format, sans-I/O (spec: docs/stream-format.md).

`StreamEncoder` turns records into bytes (page data as zero-copy buffer lists), `StreamDecoder`
is fed bytes in chunks of any size and yields records or raises a precise StreamError.
"""

from vmferry.stream.decoder import StreamDecoder
from vmferry.stream.encoder import StreamEncoder
from vmferry.stream.format import MAX_PAYLOAD, StreamLimits
from vmferry.stream.records import (
    BlockData,
    BlockDevices,
    BlockZero,
    Command,
    CommandCode,
    Config,
    Description,
    DeviceSection,
    DiskInfo,
    EndOfStream,
    PassStart,
    RamBlockInfo,
    RamBlocks,
    RamPageList,
    RamPages,
    RamZero,
    Record,
    RecordType,
    SectionInfo,
    SectionPhase,
    Skipped,
    StreamHeader,
)

__all__ = [
    "MAX_PAYLOAD", "BlockData", "BlockDevices", "BlockZero", "Command", "CommandCode", "Config",
    "Description", "DeviceSection", "DiskInfo", "EndOfStream", "PassStart", "RamBlockInfo", "RamBlocks",
    "RamPageList", "RamPages", "RamZero", "Record", "RecordType", "SectionInfo", "SectionPhase", "Skipped",
    "StreamDecoder", "StreamEncoder", "StreamHeader", "StreamLimits",
]
