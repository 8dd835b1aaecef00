//! The codec under tokio-util's `Framed`, over an in-memory pipe with a tiny buffer so that
//! frames arrive in many partial reads.

use bytes::Bytes;
use ferry_proto::{Encoding, FrameCodec, Message, ProtoError};
use futures_util::{SinkExt, StreamExt};
use tokio::io::AsyncWriteExt;
use tokio_util::codec::Framed;

use crate::samples::{id, max_string, small_messages, TRANSFER};

#[tokio::test]
async fn a_mixed_sequence_survives_partial_reads() {
    let mut messages = small_messages();
    messages.push(Message::Chunk {
        transfer: TRANSFER,
        round: 9,
        index: 1,
        id: id(3),
        encoding: Encoding::Raw,
        raw_len: 256 * 1024,
        data: Bytes::from(
            (0..256 * 1024)
                .map(|i| (i % 251) as u8)
                .collect::<Vec<u8>>(),
        ),
    });
    messages.push(Message::Error {
        code: 3,
        message: max_string(),
    });
    messages.extend(small_messages().into_iter().rev());

    // 61 bytes: smaller than most frames and not a divisor of any, so reads split headers,
    // fields and chunk data at varying points.
    let (near, far) = tokio::io::duplex(61);
    let sending = async {
        let mut sender = Framed::new(near, FrameCodec);
        for (i, msg) in messages.iter().enumerate() {
            // Both encoder impls: by reference and by value.
            if i % 2 == 0 {
                sender.send(msg).await.unwrap();
            } else {
                sender.send(msg.clone()).await.unwrap();
            }
        }
        // Two Encoder impls: flush/close must name the item type.
        SinkExt::<Message>::close(&mut sender).await.unwrap();
    };
    let receiving = async {
        let mut receiver = Framed::new(far, FrameCodec);
        let mut received = Vec::new();
        while let Some(msg) = receiver.next().await {
            received.push(msg.unwrap());
        }
        received
    };
    let ((), received) = tokio::join!(sending, receiving);
    assert_eq!(received.len(), messages.len());
    for (got, sent) in received.iter().zip(&messages) {
        assert_eq!(got, sent);
    }
}

#[tokio::test]
async fn a_decode_error_surfaces_from_the_stream() {
    let (mut near, far) = tokio::io::duplex(64);
    near.write_all(&[0x04, 0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 1, 0xee, 0, 0, 0, 0])
        .await
        .unwrap();
    drop(near);
    let mut receiver = Framed::new(far, FrameCodec);
    assert_eq!(
        receiver.next().await.unwrap().unwrap(),
        Message::Ping { nonce: 1 }
    );
    match receiver.next().await.unwrap() {
        Err(ProtoError::UnknownMessageType { type_byte: 0xee }) => {}
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn closing_mid_frame_is_an_error() {
    let (mut near, far) = tokio::io::duplex(64);
    near.write_all(&[0x05, 0, 0, 0, 8, 1, 2, 3]).await.unwrap();
    drop(near);
    let mut receiver = Framed::new(far, FrameCodec);
    match receiver.next().await.unwrap() {
        Err(ProtoError::UnexpectedEof { buffered: 8 }) => {}
        other => panic!("{other:?}"),
    }
}
