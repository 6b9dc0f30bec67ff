//! Validation of an ONNX file before tract sees it: the protobuf decodes, every tensor's declared size is
//! computed with checked arithmetic and matches the bytes it carries, data types are ones tract loads from
//! raw bytes, and nothing points at external files. tract allocates from these declarations, so a lying file
//! must be refused here, not there.

pub(crate) use super::pb;
use pb::{tensor_proto::DataType, GraphProto, ModelProto, TensorProto};

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

fn io_of(v: &pb::ValueInfoProto) -> Io {
    use pb::tensor_shape_proto::dimension::Value;
    use pb::type_proto::Value as TV;
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

/// Move the dequantization of weight-only-int8 embedding tables after the row lookup:
/// `Gather(Mul(Cast(Wq), scale), ids)` becomes `Mul(Cast(Gather(Wq, ids)), Gather(scale, ids))` when `Wq` is an
/// initializer `[rows, cols]`, `scale` an initializer `[rows, 1]` and the gather is on axis 0. Casting and
/// scaling each row commute with picking rows, so the results are bit-identical; but tract folds constants
/// only up to 4 MiB, so without this the whole word-embedding table (30522 × 384 in MiniLM) is cast and
/// scaled on every run. Returns how many gathers were rewritten.
#[cfg(feature = "onnx")]
pub(crate) fn gather_before_dequantize(proto: &mut tract_onnx::pb::ModelProto) -> usize {
    use std::collections::HashMap;
    use tract_onnx::pb::{tensor_proto::DataType, AttributeProto, NodeProto};
    let Some(g) = proto.graph.as_mut() else {
        return 0;
    };
    let dims: HashMap<&str, (&[i64], i32)> = g
        .initializer
        .iter()
        .map(|t| (t.name.as_str(), (t.dims.as_slice(), t.data_type)))
        .collect();
    let producer: HashMap<&str, usize> = g
        .node
        .iter()
        .enumerate()
        .flat_map(|(i, n)| n.output.iter().map(move |o| (o.as_str(), i)))
        .collect();
    let int_attr = |n: &NodeProto, name: &str, default: i64| {
        n.attribute
            .iter()
            .find(|a| a.name == name)
            .map_or(default, |a| a.i)
    };
    // (gather index, quantized table, scale, cast index, mul index)
    let mut plans = Vec::new();
    for (gi, n) in g.node.iter().enumerate() {
        if n.op_type != "Gather" || n.input.len() != 2 || int_attr(n, "axis", 0) != 0 {
            continue;
        }
        let Some(&mi) = producer.get(n.input[0].as_str()) else {
            continue;
        };
        let mul = &g.node[mi];
        if mul.op_type != "Mul" || mul.input.len() != 2 {
            continue;
        }
        for (a, b) in [(0, 1), (1, 0)] {
            let (Some(&ci), Some(&(sd, st))) = (
                producer.get(mul.input[a].as_str()),
                dims.get(mul.input[b].as_str()),
            ) else {
                continue;
            };
            let cast = &g.node[ci];
            let Some(&(qd, _)) = cast.input.first().and_then(|q| dims.get(q.as_str())) else {
                continue;
            };
            let f32_type = DataType::Float as i32;
            if cast.op_type == "Cast"
                && int_attr(cast, "to", 0) == f32_type as i64
                && st == f32_type
                && qd.len() == 2
                && sd == [qd[0], 1]
            {
                plans.push((gi, cast.input[0].clone(), mul.input[b].clone(), ci, mi));
                break;
            }
        }
    }
    let count = plans.len();
    let mut replace: HashMap<usize, Vec<NodeProto>> = HashMap::new();
    // Outputs of the full-table Cast and Mul nodes, dropped below when nothing else reads them.
    let mut table_outputs = std::collections::HashSet::new();
    for (gi, wq, scale, ci, mi) in plans {
        let old = &g.node[gi];
        let (ids, out) = (old.input[1].clone(), old.output[0].clone());
        let node =
            |op: &str, inputs: Vec<String>, output: String, attrs: Vec<AttributeProto>| NodeProto {
                op_type: op.to_string(),
                name: format!("{output}__lorag"),
                input: inputs,
                output: vec![output],
                attribute: attrs,
                ..Default::default()
            };
        let to = AttributeProto {
            name: "to".into(),
            r#type: 2, // INT
            i: DataType::Float as i32 as i64,
            ..Default::default()
        };
        let (q_rows, f_rows, s_rows) = (
            format!("{out}__q_rows"),
            format!("{out}__f_rows"),
            format!("{out}__s_rows"),
        );
        replace.insert(
            gi,
            vec![
                node("Gather", vec![wq, ids.clone()], q_rows.clone(), vec![]),
                node("Cast", vec![q_rows], f_rows.clone(), vec![to]),
                node("Gather", vec![scale, ids], s_rows.clone(), vec![]),
                node("Mul", vec![f_rows, s_rows], out, vec![]),
            ],
        );
        table_outputs.extend(g.node[mi].output.iter().cloned());
        table_outputs.extend(g.node[ci].output.iter().cloned());
    }
    if count == 0 {
        return 0;
    }
    let old_nodes = std::mem::take(&mut g.node);
    let mut nodes = Vec::with_capacity(old_nodes.len() + 3 * count);
    for (i, n) in old_nodes.into_iter().enumerate() {
        match replace.remove(&i) {
            Some(new) => nodes.extend(new),
            None => nodes.push(n),
        }
    }
    g.node = nodes;
    // Drop the full-table Mul, then Cast, when nothing reads them any more.
    for _ in 0..2 {
        let used: std::collections::HashSet<String> = g
            .node
            .iter()
            .flat_map(|n| n.input.iter().cloned())
            .chain(g.output.iter().map(|o| o.name.clone()))
            .collect();
        g.node.retain(|n| {
            n.output.is_empty()
                || !n
                    .output
                    .iter()
                    .all(|o| table_outputs.contains(o) && !used.contains(o))
        });
    }
    count
}

#[cfg(all(test, feature = "onnx"))]
mod tests {
    use super::*;

    /// MiniLM int8 has two dequantized tables behind a Gather (word and position embeddings); both are
    /// rewritten and the full-table Cast and Mul nodes are gone. (Bit-exactness: tests/embed.rs.)
    #[test]
    fn gathers_move_before_dequantization() {
        let bytes = include_bytes!("../../models/all-MiniLM-L6-v2-int8/model.onnx");
        decode_and_validate(bytes, 1 << 30).unwrap();
        let mut proto = <tract_onnx::pb::ModelProto as prost::Message>::decode(&bytes[..]).unwrap();
        let before = proto.graph.as_ref().unwrap().node.len();
        assert_eq!(gather_before_dequantize(&mut proto), 2);
        let g = proto.graph.as_ref().unwrap();
        // Each rewrite: −Gather −Mul −Cast +Gather +Cast +Gather +Mul.
        assert_eq!(g.node.len(), before + 2);
        assert!(g.node.iter().all(|n| n
            .output
            .iter()
            .all(|o| !o.ends_with("word_embeddings.weight_f"))));
        assert_eq!(
            gather_before_dequantize(&mut proto),
            0,
            "nothing left to move"
        );
    }
}
