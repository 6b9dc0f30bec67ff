//! Validation of an ONNX file before tract sees it: the protobuf decodes, every tensor's declared size is
//! computed with checked arithmetic and matches the bytes it carries, data types are ones tract loads from
//! raw bytes, and nothing points at external files. tract allocates from these declarations, so a lying file
//! must be refused here, not there.

use tract_onnx::pb::{tensor_proto::DataType, GraphProto, ModelProto, TensorProto};

use crate::{Error, Result};

fn bad(detail: String) -> Error {
    Error::Model {
        file: "model.onnx",
        detail,
    }
}

/// Bytes per element for the types tract reads from raw data; `None` for the others.
fn elem_size(dt: i32) -> Option<usize> {
    let dt = DataType::try_from(dt).ok()?;
    Some(match dt {
        DataType::Float | DataType::Int32 | DataType::Uint32 => 4,
        DataType::Uint8 | DataType::Int8 | DataType::Bool => 1,
        DataType::Uint16 | DataType::Int16 | DataType::Float16 => 2,
        DataType::Int64 | DataType::Uint64 | DataType::Double => 8,
        _ => return None,
    })
}

fn check_tensor(t: &TensorProto, max_bytes: usize) -> Result<()> {
    let name = if t.name.is_empty() {
        "<unnamed>"
    } else {
        t.name.as_str()
    };
    if t.data_location == Some(1) {
        return Err(bad(format!(
            "tensor {name} keeps its data in an external file; lorag loads models from bytes only"
        )));
    }
    if t.dims.len() > 8 {
        return Err(bad(format!(
            "tensor {name} has {} dimensions",
            t.dims.len()
        )));
    }
    let mut numel: usize = 1;
    for &d in &t.dims {
        if d < 0 {
            return Err(bad(format!("tensor {name} has a negative dimension {d}")));
        }
        let d = usize::try_from(d).map_err(|_| {
            bad(format!(
                "tensor {name}: dimension {d} overflows the address space"
            ))
        })?;
        numel = numel
            .checked_mul(d)
            .ok_or_else(|| bad(format!("tensor {name}: element count overflows")))?;
    }
    let size = elem_size(t.data_type).ok_or_else(|| {
        bad(format!(
            "tensor {name} has data type {} which lorag does not load",
            t.data_type
        ))
    })?;
    let bytes = numel
        .checked_mul(size)
        .ok_or_else(|| bad(format!("tensor {name}: byte size overflows")))?;
    if bytes > max_bytes {
        return Err(Error::ResourceLimit {
            what: "onnx tensor bytes",
            size: bytes as u64,
            limit: max_bytes as u64,
        });
    }
    let typed_len = t.float_data.len()
        + t.int32_data.len()
        + t.int64_data.len()
        + t.double_data.len()
        + t.uint64_data.len();
    if !t.raw_data.is_empty() {
        if t.raw_data.len() != bytes {
            return Err(bad(format!(
                "tensor {name}: dims {:?} × {size} bytes = {bytes} bytes, but it carries {} bytes",
                t.dims,
                t.raw_data.len()
            )));
        }
    } else if typed_len != numel {
        return Err(bad(format!(
            "tensor {name}: dims {:?} give {numel} elements, but it carries {typed_len}",
            t.dims
        )));
    }
    Ok(())
}

/// Decode and validate. `max_tensor_bytes` caps any one tensor.
pub(crate) fn decode_and_validate(bytes: &[u8], max_tensor_bytes: usize) -> Result<ModelProto> {
    use prost::Message;
    let proto =
        ModelProto::decode(bytes).map_err(|e| bad(format!("not a valid ONNX protobuf: {e}")))?;
    let graph = proto
        .graph
        .as_ref()
        .ok_or_else(|| bad("the file holds no graph".into()))?;
    // Walk the graph and its subgraphs (If/Loop/Scan bodies) without recursion.
    let mut stack: Vec<(&GraphProto, usize)> = vec![(graph, 0)];
    while let Some((g, depth)) = stack.pop() {
        if depth > 16 {
            return Err(bad("subgraphs nested more than 16 deep".into()));
        }
        for t in &g.initializer {
            check_tensor(t, max_tensor_bytes)?;
        }
        if !g.sparse_initializer.is_empty() {
            return Err(bad("sparse initializers are not supported".into()));
        }
        for node in &g.node {
            for a in &node.attribute {
                if let Some(t) = &a.t {
                    check_tensor(t, max_tensor_bytes)?;
                }
                for t in &a.tensors {
                    check_tensor(t, max_tensor_bytes)?;
                }
                if let Some(sub) = &a.g {
                    stack.push((sub, depth + 1));
                }
                for sub in &a.graphs {
                    stack.push((sub, depth + 1));
                }
            }
        }
    }
    Ok(proto)
}

/// A graph input or output: its name and its dims (`Ok(n)` fixed, `Err(name)` symbolic).
pub(crate) struct Io {
    pub name: String,
    pub elem_type: i32,
    pub dims: Option<Vec<std::result::Result<i64, String>>>,
}

fn io_of(v: &tract_onnx::pb::ValueInfoProto) -> Io {
    use tract_onnx::pb::tensor_shape_proto::dimension::Value;
    use tract_onnx::pb::type_proto::Value as TV;
    let (elem_type, dims) = match v.r#type.as_ref().and_then(|t| t.value.as_ref()) {
        Some(TV::TensorType(t)) => (
            t.elem_type,
            t.shape.as_ref().map(|s| {
                s.dim
                    .iter()
                    .map(|d| match &d.value {
                        Some(Value::DimValue(n)) => Ok(*n),
                        Some(Value::DimParam(p)) => Err(p.clone()),
                        None => Err(String::new()),
                    })
                    .collect()
            }),
        ),
        _ => (0, None),
    };
    Io {
        name: v.name.clone(),
        elem_type,
        dims,
    }
}

/// The graph's real inputs (initializers listed as inputs by old exporters are skipped) and its outputs.
pub(crate) fn graph_io(proto: &ModelProto) -> (Vec<Io>, Vec<Io>) {
    let g = proto.graph.as_ref().expect("validated");
    let inits: std::collections::HashSet<&str> =
        g.initializer.iter().map(|t| t.name.as_str()).collect();
    let inputs = g
        .input
        .iter()
        .filter(|v| !inits.contains(v.name.as_str()))
        .map(io_of)
        .collect();
    let outputs = g.output.iter().map(io_of).collect();
    (inputs, outputs)
}

/// Rows of the word-embedding table, when an initializer says so (for checking the tokenizer's vocabulary).
pub(crate) fn word_embedding_rows(proto: &ModelProto) -> Option<i64> {
    let g = proto.graph.as_ref()?;
    g.initializer
        .iter()
        .find(|t| t.name.contains("word_embeddings") && t.dims.len() == 2)
        .map(|t| t.dims[0])
}
