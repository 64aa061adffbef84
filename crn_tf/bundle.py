"""A reader of TensorFlow's checkpoint format (the TensorBundle: `prefix.index` + data shards) in NumPy.

So a model_dir's checkpoint loads on any Keras backend without TensorFlow (the GPU machines JAX
runs on may have none). The index is a LevelDB-format table (uncompressed, as TensorFlow writes
checkpoints) mapping each key to a `BundleEntryProto` (dtype, shape, shard, offset, size, crc32c);
the values are the tensors' raw little-endian bytes in `prefix.data-SSSSS-of-NNNNN`. Only whole
tensors of numeric dtypes are read (what `tf.train.Checkpoint` writes for variables); anything else
raises a ValueError naming the key. Tested against `tf.train.load_checkpoint` (tests/test_backends.py).
"""

from __future__ import annotations

import os
import struct

import numpy as np

_TABLE_MAGIC = 0xDB4775248B80FB57
_OBJECT_GRAPH = "_CHECKPOINTABLE_OBJECT_GRAPH"  # the object graph's key (a serialized TrackableObjectGraph)
_FOOTER_SIZE = 48
_BLOCK_TRAILER = 5  # compression type (1 byte) + crc32c (4 bytes)
# TensorFlow's DataType enum -> NumPy dtypes (types.proto); bfloat16 is read as its raw uint16 bits.
_DTYPES = {
    1: np.float32,
    2: np.float64,
    3: np.int32,
    4: np.uint8,
    5: np.int16,
    6: np.int8,
    9: np.int64,
    10: np.bool_,
    17: np.uint16,
    19: np.float16,
    22: np.uint32,
    23: np.uint64,
}


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _proto_fields(data: bytes) -> list[tuple[int, int | bytes]]:
    """(field number, value) pairs of a serialized protobuf message: ints for varint and fixed
    fields, bytes for length-delimited ones."""
    fields, pos = [], 0
    while pos < len(data):
        tag, pos = _varint(data, pos)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            value, pos = _varint(data, pos)
        elif wire == 1:
            value, pos = struct.unpack_from("<Q", data, pos)[0], pos + 8
        elif wire == 2:
            length, pos = _varint(data, pos)
            value, pos = data[pos : pos + length], pos + length
        elif wire == 5:
            value, pos = struct.unpack_from("<I", data, pos)[0], pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        fields.append((number, value))
    return fields


def _block_entries(block: bytes) -> list[tuple[bytes, bytes]]:
    """The (key, value) entries of one table block (keys prefix-compressed against the previous)."""
    num_restarts = struct.unpack_from("<I", block, len(block) - 4)[0]
    end = len(block) - 4 - 4 * num_restarts
    entries, pos, key = [], 0, b""
    while pos < end:
        shared, pos = _varint(block, pos)
        unshared, pos = _varint(block, pos)
        value_length, pos = _varint(block, pos)
        key = key[:shared] + block[pos : pos + unshared]
        pos += unshared
        entries.append((key, block[pos : pos + value_length]))
        pos += value_length
    return entries


def _read_block(data: bytes, handle: bytes, path: str) -> bytes:
    offset, pos = _varint(handle, 0)
    size, _ = _varint(handle, pos)
    if offset + size + _BLOCK_TRAILER > len(data):
        raise ValueError(f"{path}: truncated (a block ends past the file's {len(data)} bytes)")
    if data[offset + size] != 0:
        raise ValueError(
            f"{path}: compressed table blocks are not supported (TensorFlow writes checkpoints uncompressed)"
        )
    return data[offset : offset + size]


class BundleReader:
    """The tensors of one TensorFlow checkpoint, by key (`model/head/conv/bias/.ATTRIBUTES/VARIABLE_VALUE`).

    Args:
        prefix: the checkpoint prefix (`model_dir/ckpt-400`): `prefix.index` and its data shards are read.

    Raises:
        ValueError: the index is missing, truncated or not a checkpoint index (naming the file).
    """

    def __init__(self, prefix: str):
        self.prefix = prefix
        index = prefix + ".index"
        try:
            with open(index, "rb") as f:
                data = f.read()
        except OSError as e:
            raise ValueError(f"{index}: cannot read the checkpoint index ({e.strerror})") from e
        if len(data) < _FOOTER_SIZE or struct.unpack_from("<Q", data, len(data) - 8)[0] != _TABLE_MAGIC:
            raise ValueError(f"{index}: not a TensorFlow checkpoint index (no table footer; truncated?)")
        footer = data[len(data) - _FOOTER_SIZE :]
        _, pos = _varint(footer, _varint(footer, 0)[1])  # skip the metaindex handle
        index_handle = footer[pos:]
        self._entries: dict[str, dict] = {}
        self._graph: list | None = None  # the object graph's nodes: (children by name, attribute keys)
        num_shards = 1
        for _, data_handle in _block_entries(_read_block(data, index_handle, index)):
            for key, value in _block_entries(_read_block(data, data_handle, index)):
                if not key:  # the BundleHeaderProto: num_shards (1), endianness (2)
                    header = dict(_proto_fields(value))
                    num_shards = header.get(1, 1)
                    if header.get(2, 0) != 0:
                        raise ValueError(f"{index}: a big-endian checkpoint; only little-endian ones are read")
                    continue
                self._entries[key.decode()] = self._entry(value)
        self.num_shards = num_shards

    @staticmethod
    def _entry(value: bytes) -> dict:
        entry = {"dtype": 0, "shape": [], "shard_id": 0, "offset": 0, "size": 0, "sliced": False}
        for number, v in _proto_fields(value):
            if number == 1:
                entry["dtype"] = v
            elif number == 2:  # TensorShapeProto: dim (2) { size (1) }
                entry["shape"] = [dict(_proto_fields(d)).get(1, 0) for n, d in _proto_fields(v) if n == 2]
            elif number in (3, 4, 5):
                entry[{3: "shard_id", 4: "offset", 5: "size"}[number]] = v
            elif number == 7:
                entry["sliced"] = True
        return entry

    def read_string(self, key: str) -> bytes:
        """A scalar string tensor (TensorFlow stores its length as a varint, a 4-byte checksum of the
        lengths, then the bytes)."""
        e = self._entries.get(key)
        if e is None or e["dtype"] != 7 or e["shape"]:
            raise ValueError(f"{self.prefix}: {key!r} is not a scalar string tensor")
        raw = self._raw(key, e)
        length, pos = _varint(raw, 0)
        return raw[pos + 4 : pos + 4 + length]

    def variable_key(self, path: str) -> str | None:
        """The checkpoint key of the variable at object path `path` (attribute names from the root
        joined by `/`, e.g. `model/module_4x8/conv1/_kernel`), from the checkpoint's object graph; None
        if there is none.

        A `tf.train.Checkpoint` names each tensor by the first path that reaches it, so a trainer's
        checkpoint may store the model's kernels under `optimizer/_trainable_variables/3/...`; the
        object graph still says that `model/module_4x8/conv1/_kernel` is that variable.
        """
        if self._graph is None:
            graph = _proto_fields(self.read_string(_OBJECT_GRAPH))
            self._graph = []
            for number, value in graph:
                if number != 1:  # TrackableObjectGraph.nodes
                    continue
                children, attributes = {}, {}
                for n, v in _proto_fields(value):
                    if n == 1:  # ObjectReference: node_id (1), local_name (2)
                        child = dict(_proto_fields(v))
                        children[child.get(2, b"").decode()] = child.get(1, 0)
                    elif n == 2:  # SerializedTensor: name (1), full_name (2), checkpoint_key (3)
                        attribute = dict(_proto_fields(v))
                        attributes[attribute.get(1, b"").decode()] = attribute.get(3, b"").decode()
                self._graph.append((children, attributes))
        node = 0
        for name in path.split("/"):
            node = self._graph[node][0].get(name)
            if node is None:
                return None
        return self._graph[node][1].get("VARIABLE_VALUE")

    def tensor_names(self) -> list[str]:
        return sorted(self._entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._entries[key]["shape"])

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def read(self, key: str) -> np.ndarray:
        """The tensor stored under `key`."""
        if key not in self._entries:
            raise KeyError(f"{self.prefix}: no tensor {key!r} in the checkpoint")
        e = self._entries[key]
        dtype = _DTYPES.get(e["dtype"])
        if dtype is None or e["sliced"]:
            raise ValueError(f"{self.prefix}: {key!r} has TensorFlow dtype enum {e['dtype']}, which is not read here")
        raw = self._raw(key, e)
        count = int(np.prod(e["shape"], dtype=np.int64))
        if e["size"] != count * np.dtype(dtype).itemsize:
            raise ValueError(f"{self.prefix}: {key!r} has {e['size']} bytes for {count} {np.dtype(dtype).name} values")
        return np.frombuffer(raw, dtype=dtype).reshape(e["shape"]).copy()

    def _raw(self, key: str, e: dict) -> bytes:
        shard = f"{self.prefix}.data-{e['shard_id']:05d}-of-{self.num_shards:05d}"
        try:
            with open(shard, "rb") as f:
                f.seek(e["offset"])
                raw = f.read(e["size"])
        except OSError as err:
            raise ValueError(f"{shard}: cannot read the checkpoint data ({err.strerror})") from err
        if len(raw) != e["size"]:
            raise ValueError(f"{shard} ({os.path.getsize(shard)} bytes): truncated or corrupt at {key!r}")
        return raw
