//! The pure parts of index artifacts: choosing among listed artifacts,
//! updating the tag-schema index, the manifest we write and read back (with
//! and without a prefetch list), the list's filtering to the image's layers,
//! and the index blob's round trip and failure modes.

use super::*;

const M: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
const A: &str = "sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
const B: &str = "sha256:bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";
const C: &str = "sha256:cccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccc";

fn d(s: &str) -> Digest {
    s.parse().unwrap()
}

fn listed(digest: &str, artifact_type: &str, created: Option<&str>) -> Value {
    let mut v = json!({"mediaType": OCI_MANIFEST, "digest": digest, "size": 10,
                       "artifactType": artifact_type});
    if let Some(c) = created {
        v["annotations"] = json!({ CREATED: c });
    }
    v
}

fn listing(entries: &[Value]) -> Vec<u8> {
    json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}).to_string().into()
}

#[test]
fn the_newest_rmount_artifact_is_chosen() {
    let sig = "application/vnd.dev.cosign.artifact.sig.v1+json";
    let bytes = listing(&[
        listed(A, INDEX_ARTIFACT_TYPE, Some("2024-05-01T10:00:00Z")),
        listed(B, INDEX_ARTIFACT_TYPE, Some("2024-05-02T09:00:00+02:00")),
        listed(C, sig, Some("2030-01-01T00:00:00Z")),
        listed(A, INDEX_ARTIFACT_TYPE, None),
    ]);
    assert_eq!(newest_artifact(&bytes).unwrap(), Some(d(B)));
    // Time zones compare as instants; equal times go to the later entry.
    let bytes = listing(&[
        listed(A, INDEX_ARTIFACT_TYPE, Some("2024-05-01T12:00:00+02:00")),
        listed(B, INDEX_ARTIFACT_TYPE, Some("2024-05-01T10:00:00Z")),
    ]);
    assert_eq!(newest_artifact(&bytes).unwrap(), Some(d(B)));
    // Undated entries lose to dated ones, and among themselves the last wins.
    let undated =
        listing(&[listed(A, INDEX_ARTIFACT_TYPE, None), listed(B, INDEX_ARTIFACT_TYPE, None)]);
    assert_eq!(newest_artifact(&undated).unwrap(), Some(d(B)));
}

#[test]
fn listings_without_an_rmount_artifact_give_none_and_garbage_is_an_error() {
    let other = listing(&[listed(A, "application/x-other", None)]);
    assert_eq!(newest_artifact(&other).unwrap(), None);
    assert_eq!(newest_artifact(br#"{"schemaVersion":2}"#).unwrap(), None);
    let bad_digest = listing(&[listed("md5:abc", INDEX_ARTIFACT_TYPE, None)]);
    assert_eq!(newest_artifact(&bad_digest).unwrap(), None, "unusable entries are skipped");
    assert!(newest_artifact(b"<html>").is_err());
}

#[test]
fn the_fallback_index_is_created_or_updated_in_place() {
    let ours = listed(C, INDEX_ARTIFACT_TYPE, Some("2024-06-01T00:00:00Z"));
    let created: Value =
        serde_json::from_slice(&with_referrer(None, ours.clone()).unwrap()).unwrap();
    assert_eq!(created["mediaType"], OCI_INDEX);
    assert_eq!(created["schemaVersion"], 2);
    assert_eq!(created["manifests"], json!([ours.clone()]));

    // Another tool's referrer (with fields we do not know) stays as it was;
    // the older rmount index is replaced.
    let mut signature = listed(A, "application/vnd.dev.cosign.artifact.sig.v1+json", None);
    signature["x-unknown"] = json!({"kept": true});
    let existing = listing(&[listed(B, INDEX_ARTIFACT_TYPE, None), signature.clone()]);
    let updated = with_referrer(Some(&existing), ours.clone()).unwrap();
    let updated: Value = serde_json::from_slice(&updated).unwrap();
    assert_eq!(updated["manifests"], json!([signature, ours]));
}

#[test]
fn a_fallback_tag_holding_something_else_is_not_overwritten() {
    let ours = listed(C, INDEX_ARTIFACT_TYPE, None);
    let manifest = br#"{"schemaVersion":2,"config":{},"layers":[]}"#;
    let err = with_referrer(Some(manifest), ours.clone()).unwrap_err();
    assert!(err.contains("not overwriting"), "{err}");
    assert!(with_referrer(Some(b"not json"), ours.clone()).is_err());
    assert!(with_referrer(Some(br#"{"manifests":{}}"#), ours).is_err());
}

#[test]
fn fallback_tags_follow_the_tag_schema() {
    assert_eq!(fallback_tag(&d(M)), format!("sha256-{}", &M[7..]));
}

fn subject() -> Manifest {
    let bytes = br#"{"schemaVersion":2}"#.to_vec();
    Manifest {
        digest: Digest::of(&bytes),
        media_type: "application/vnd.docker.distribution.manifest.v2+json".into(),
        bytes,
    }
}

fn layers() -> Vec<IndexedLayer> {
    vec![
        IndexedLayer { digest: d(A), size: 100, index_digest: d(B), index_size: 7 },
        IndexedLayer { digest: d(C), size: 200, index_digest: d(M), index_size: 9 },
    ]
}

#[test]
fn the_artifact_manifest_reads_back_to_its_blobs() {
    let subject = subject();
    let bytes = artifact_manifest(&subject, &layers(), None, "2024-06-01T00:00:00.000Z");
    let json: Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(json["artifactType"], INDEX_ARTIFACT_TYPE);
    assert_eq!(json["mediaType"], OCI_MANIFEST);
    assert_eq!(json["config"]["mediaType"], EMPTY_MEDIA_TYPE);
    assert_eq!(
        json["config"]["digest"],
        "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
    );
    assert_eq!(json["config"]["size"], 2);
    assert_eq!(json["subject"]["digest"], subject.digest.to_string());
    assert_eq!(json["subject"]["mediaType"], subject.media_type);
    assert_eq!(json["subject"]["size"], subject.bytes.len());
    assert_eq!(json["annotations"][CREATED], "2024-06-01T00:00:00.000Z");
    assert_eq!(json["layers"][1]["annotations"][LAYER_DIGEST_ANNOTATION], C);
    assert_eq!(json["layers"].as_array().unwrap().len(), 2, "no prefetch list blob");
    let blobs = parse_artifact(&bytes, &subject.digest).unwrap();
    assert_eq!(blobs, wanted_blobs(&layers(), None));
    assert_eq!(blobs.prefetch_list, None);
}

fn list_of(files: &[(&str, &str)]) -> PrefetchList {
    let files = files
        .iter()
        .map(|(layer, path)| crate::fs::record::RecordedFile {
            layer: d(layer),
            path: path.to_string(),
        })
        .collect();
    PrefetchList { version: 1, files }
}

#[test]
fn a_prefetch_list_is_one_more_blob_and_reads_back() {
    let subject = subject();
    let (list, bytes) =
        list_blob(&list_of(&[(A, "usr/bin/python3")]), &[d(A), d(C)], "app").unwrap();
    assert_eq!(list.files, 1);
    assert_eq!(list.digest, Digest::of(&bytes));
    assert_eq!(list.size, bytes.len() as u64);
    assert_eq!(PrefetchList::parse(&bytes).unwrap(), list_of(&[(A, "usr/bin/python3")]));

    let manifest = artifact_manifest(&subject, &layers(), Some(&list), "2024-06-01T00:00:00Z");
    let json: Value = serde_json::from_slice(&manifest).unwrap();
    let blobs = json["layers"].as_array().unwrap();
    assert_eq!(blobs.len(), 3);
    assert_eq!(blobs[2]["mediaType"], PREFETCH_LIST_MEDIA_TYPE);
    assert_eq!(blobs[2]["digest"], list.digest.to_string());
    assert_eq!(blobs[2]["size"], list.size);
    let parsed = parse_artifact(&manifest, &subject.digest).unwrap();
    assert_eq!(parsed, wanted_blobs(&layers(), Some(&list)));
    assert_eq!(parsed.indexes, wanted_blobs(&layers(), None).indexes, "the indexes are the same");
    // Another list, or none, is another artifact: "already published" does not hold.
    assert_ne!(parsed, wanted_blobs(&layers(), None));
    let other = ListBlob { digest: d(M), ..list.clone() };
    assert_ne!(parsed, wanted_blobs(&layers(), Some(&other)));

    // A list descriptor with a malformed digest counts as no list, and
    // does not make the indexes unusable.
    let mut json = json;
    json["layers"][2]["digest"] = json!("md5:abc");
    let parsed = parse_artifact(json.to_string().as_bytes(), &subject.digest).unwrap();
    assert_eq!(parsed, wanted_blobs(&layers(), None));
}

#[test]
fn only_the_files_of_the_image_layers_are_kept_once_in_order() {
    let given = list_of(&[(C, "b"), (B, "x"), (A, "a"), (C, "b"), (B, "y"), (B, "x"), (A, "c")]);
    let (kept, left_out) = image_files(&given, &[d(A), d(C)]);
    assert_eq!(kept, list_of(&[(C, "b"), (A, "a"), (A, "c")]));
    assert_eq!(left_out.into_iter().collect::<Vec<_>>(), [(d(B), 2)]);

    let (list, bytes) = list_blob(&given, &[d(A), d(C)], "app").unwrap();
    assert_eq!(list.files, 3);
    assert_eq!(PrefetchList::parse(&bytes).unwrap(), kept);
}

#[test]
fn a_prefetch_list_with_none_of_the_image_files_is_refused() {
    let err = list_blob(&list_of(&[(B, "x")]), &[d(A)], "app:v1").unwrap_err().to_string();
    assert!(err.contains("none of the 1 files"), "{err}");
    let err = list_blob(&list_of(&[]), &[d(A)], "app:v1").unwrap_err().to_string();
    assert!(err.contains("names no files"), "{err}");
}

#[test]
fn artifacts_of_another_type_or_subject_are_refused() {
    let subject = subject();
    let bytes = artifact_manifest(&subject, &layers(), None, "2024-06-01T00:00:00Z");
    let err = parse_artifact(&bytes, &d(M)).unwrap_err();
    assert!(err.contains("subject"), "{err}");
    let mut json: Value = serde_json::from_slice(&bytes).unwrap();
    json["artifactType"] = json!("application/x-other");
    let err = parse_artifact(json.to_string().as_bytes(), &subject.digest).unwrap_err();
    assert!(err.contains("artifactType"), "{err}");
    let mut json: Value = serde_json::from_slice(&bytes).unwrap();
    json["layers"][0]["annotations"] = json!({});
    let err = parse_artifact(json.to_string().as_bytes(), &subject.digest).unwrap_err();
    assert!(err.contains(LAYER_DIGEST_ANNOTATION), "{err}");
    // Blobs of other media types are not indexes and are left alone.
    let mut json: Value = serde_json::from_slice(&bytes).unwrap();
    json["layers"][0]["mediaType"] = json!("application/octet-stream");
    let blobs = parse_artifact(json.to_string().as_bytes(), &subject.digest).unwrap();
    assert_eq!(blobs.indexes.keys().collect::<Vec<_>>(), [&d(C)]);
}

fn real_index() -> LayerIndex {
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1_700_000_000);
    h.set_size(5);
    b.append_data(&mut h, "etc/hostname", &b"hello"[..]).unwrap();
    let tar = b.into_inner().unwrap();
    build_index(&tar[..], &Digest::of(&tar)).unwrap()
}

#[test]
fn index_blobs_round_trip_and_name_their_layer() {
    let index = real_index();
    let blob = compress(&index).unwrap();
    let bytes = decompress(&blob).unwrap();
    assert_eq!(bytes, encode_index(&index));
    let back = decode_index(&bytes, &index.blob_digest).unwrap();
    assert_eq!(back.entries, index.entries);
    assert!(decode_index(&bytes, &d(A)).is_none(), "the index of another layer");
}

#[test]
fn index_blobs_that_are_not_whole_zstd_frames_are_rejected() {
    assert!(decompress(b"plain bytes").unwrap_err().contains("not zstd"));
    let truncated = &compress(&real_index()).unwrap()[..10];
    assert!(decompress(truncated).is_err());
}
